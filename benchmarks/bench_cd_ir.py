"""CD-IR cost on the real CIFAR-10 ResNet-18: CLIP embeddings once (cold), then reused from the cache (warm).

    python benchmarks/bench_cd_ir.py [--n-probe 1000] [--clip-model ViT-B-16] [--clip-pretrained none]

The cold run computes CLIP image and text embeddings and writes the clip-cache; the warm runs rank layer4 and
layer3 from the cache (CLIP is not run again), so their time is the ranked model's forward plus soft-WPMI.
Needs ``cifar10-train-4660.safetensors`` in ``--data-dir``
(default ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

os.environ.setdefault("IGD_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _data import add_data_dir, data_file  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-probe", type=int, default=1000)
    ap.add_argument("--clip-model", default="ViT-B-16")
    ap.add_argument("--clip-pretrained", default="none")
    ap.add_argument("--batch-size", type=int, default=128)
    add_data_dir(ap)
    args = ap.parse_args()
    data_path = data_file("cifar10-train-4660.safetensors", args.data_dir)
    import pyautoattack

    from igd_cli.data import load_dataset
    from igd_cli.models import load_model
    from igd_cli.ranking.cd_ir import cd_ir

    model = load_model(str(Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"), arch="resnet18").model
    data = load_dataset(str(data_path), "train", args.n_probe)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "clip.safetensors"
        for layer, label in (("layer4", "cold (CLIP runs)"), ("layer4", "warm (cache)"), ("layer3", "warm (cache)")):
            t0 = time.perf_counter()
            res = cd_ir(model, layer, data, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                        cache=cache, batch_size=args.batch_size, show_progress=False)
            total = time.perf_counter() - t0
            rows.append((layer, label, res.cache_reused, res.info["clip_seconds"], res.info["activation_seconds"],
                         res.info["wpmi_seconds"], total, tuple(res.importance.shape)))
    t = Table(title=f"CD-IR, CIFAR-10 ResNet-18, {args.n_probe} probe images, CLIP {args.clip_model} "
                    f"({args.clip_pretrained}), CPU ({torch.get_num_threads()} threads, shared)")
    for col in ("layer", "run", "cache reused", "CLIP s", "activations s", "soft-WPMI s", "total s", "shape"):
        t.add_column(col, justify="right")
    for layer, label, reused, tc, ta, tw, tt, shape in rows:
        t.add_row(layer, label, str(reused), f"{tc:.1f}", f"{ta:.1f}", f"{tw:.2f}", f"{tt:.1f}", "×".join(map(str, shape)))
    Console(width=160).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
