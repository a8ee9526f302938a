"""examples/make_tensor_file.py (the converter docs/own-model-and-data.md shows) writes files igd reads back with the
same pixels, labels, order and class names; checked on torchvision's FakeData against torchvision's own
pil_to_tensor."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.transforms.functional import pil_to_tensor

from igd_cli.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def maker():
    spec = importlib.util.spec_from_file_location("make_tensor_file", ROOT / "examples" / "make_tensor_file.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shape", [(3, 9, 7), (1, 8, 8)])
def test_pil_images_round_trip_through_igd(maker, tmp_path, shape):
    ds = torchvision.datasets.FakeData(size=11, image_size=shape, num_classes=4, random_offset=3)
    ds.classes = ["ant", "bee", "cat", "dog"]
    out = maker.to_tensor_file(ds, tmp_path / "fake.safetensors", n=7)
    got = load_dataset(str(out), "test").all()
    expected = torch.stack([pil_to_tensor(ds[i][0]) for i in range(7)])
    labels = torch.tensor([int(ds[i][1]) for i in range(7)])
    assert got.x.shape == (7, *shape)
    assert torch.equal((got.x * 255).round().to(torch.uint8), expected)
    assert torch.equal(got.y, labels)
    assert load_dataset(str(out), "test").classes == ["ant", "bee", "cat", "dog"]


def test_float_tensors_in_unit_range_and_default_class_names(maker, tmp_path):
    x = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]], [[[1.0, 0.0], [0.1, 0.9]]]])  # two 1×2×2 images
    items = [(x[0], 2), (x[1], 0)]
    out = maker.to_tensor_file(items, tmp_path / "t.safetensors")
    ds = load_dataset(str(out), "test")
    assert ds.classes == ["0", "1", "2"]
    b = ds.all()
    assert torch.equal(b.y, torch.tensor([2, 0]))
    assert torch.allclose(b.x, (x * 255).round() / 255)


def test_command_line(maker, tmp_path, monkeypatch, capsys):
    class Tiny(torchvision.datasets.FakeData):  # stands in for CIFAR10(root, train=, download=)
        def __init__(self, root, train, download):
            super().__init__(size=5 if train else 3, image_size=(3, 4, 4), num_classes=2, random_offset=int(train))
            self.classes = ["no", "yes"]

    monkeypatch.setattr(torchvision.datasets, "Tiny", Tiny, raising=False)
    maker.main(["Tiny", "--root", str(tmp_path), "--split", "train", "--n", "4", "--out", str(tmp_path / "f.safetensors")])
    ds = load_dataset(str(tmp_path / "f.safetensors"), "test")
    assert len(ds) == 4 and ds.classes == ["no", "yes"]
    ref = Tiny(None, True, False)
    assert torch.equal((ds.all().x * 255).round().to(torch.uint8), torch.stack([pil_to_tensor(ref[i][0]) for i in range(4)]))
    assert "4 images of Tiny (train)" in capsys.readouterr().out


def test_the_pages_inline_snippet_writes_a_file_igd_reads(tmp_path, monkeypatch):
    """The Python block of docs/own-model-and-data.md, run with CIFAR-10 replaced by FakeData (no download)."""
    page = (ROOT / "docs" / "own-model-and-data.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    original = 'torchvision.datasets.CIFAR10("data", train=False, download=True)'
    assert original in code
    code = code.replace(original, 'torchvision.datasets.FakeData(6, (3, 5, 4), 3)\nds.classes = ["a", "b", "c"]')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "own-model-and-data.md", "exec"), {})
    ds = load_dataset(str(tmp_path / "cifar10-test.safetensors"), "test")
    ref = torchvision.datasets.FakeData(6, (3, 5, 4), 3)
    assert ds.classes == ["a", "b", "c"] and len(ds) == 6
    assert torch.equal((ds.all().x * 255).round().to(torch.uint8), torch.stack([pil_to_tensor(ref[i][0]) for i in range(6)]))
    assert torch.equal(ds.all().y, torch.tensor([int(ref[i][1]) for i in range(6)]))
