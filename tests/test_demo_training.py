"""The demo model's training script is reproducible and records its ε."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from igd_cli.artifacts import load_artifact

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_demo.py"


def test_train_demo_is_reproducible(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"demo{i}.safetensors"
        subprocess.run([sys.executable, str(SCRIPT), "--epochs", "1", "--steps", "2", "--out", str(out)],
                       check=True, capture_output=True)
        outs.append(load_artifact(out, kind="model"))
    a, b = outs
    assert a.meta["eps"] == 0.2 and a.meta["training"]["epochs"] == 1
    assert a.tensors.keys() == b.tensors.keys()
    assert all((a[k] == b[k]).all() for k in a.tensors)
