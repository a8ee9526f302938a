"""Shared fixtures: the demo model, the real CIFAR-10 ResNet-18 shipped with pyautoattack, a CLI runner."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("IGD_NO_PROGRESS", "1")
# every igd code path must declare the images it queries a randomized model for (igd_cli.noise.STRICT)
os.environ.setdefault("IGD_NOISE_STRICT", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_resnet18_path() -> Path:
    import pyautoattack

    return Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"


@pytest.fixture(autouse=True)
def _numerics_restored():
    """torch's numerics flags are process-wide: a test that applies ``--numerics fast`` must not leave it on."""
    from igd_cli import numerics

    state = numerics.snapshot()
    yield
    numerics.restore(state)


@pytest.fixture(scope="session")
def demo():
    from igd_cli.models import load_model

    return load_model("demo")


@pytest.fixture(scope="session")
def digits_test():
    from igd_cli.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def resnet18_path() -> Path:
    return real_resnet18_path()


@pytest.fixture(scope="session")
def resnet18(resnet18_path):
    """The real (not adversarially trained) CIFAR-10 ResNet-18 from pyautoattack's examples."""
    from igd_cli.models import load_model

    return load_model(str(resnet18_path), arch="resnet18")


@pytest.fixture
def igd_home(tmp_path, monkeypatch):
    home = tmp_path / "igd_home"
    monkeypatch.setenv("IGD_HOME", str(home))
    return home


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        lines = [ln for ln in self.out.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one JSON line on stdout, got {self.out!r}"
        return json.loads(lines[0])


@pytest.fixture
def cli(capsys):
    """Run ``igd ARGS...`` in-process; returns exit code, stdout and stderr."""
    from igd_cli.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def cifar_safetensors(tmp_path: Path, n: int = 16, seed: int = 0, classes: int = 10) -> Path:
    """A small CIFAR-shaped data set file (random images) in the ../shared/data format."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n, dtype=torch.int64) % classes
    path = tmp_path / f"cifar-like-{n}.safetensors"
    save_file({"x": x, "y": y}, str(path), metadata={"classes": json.dumps([f"class{i}" for i in range(classes)]),
                                                     "source": "random test images"})
    return path


def digits_safetensors(tmp_path: Path, split: str = "test", n: int | None = None) -> Path:
    """The first ``n`` images of a digits split as a tensor file in the ../shared/data format (a file has no
    splits: the demo model's data without the split structure, as a new user's own files would be)."""
    from safetensors.torch import save_file

    from igd_cli.data import DIGITS_CLASSES, load_dataset

    data = load_dataset("digits", split, n)
    b = data.all()
    path = tmp_path / f"digits-{split}-{len(data)}.safetensors"
    save_file({"x": (b.x * 255).round().to(torch.uint8), "y": b.y}, str(path),
              metadata={"classes": json.dumps(DIGITS_CLASSES), "source": f"sklearn digits, {split} split"})
    return path
