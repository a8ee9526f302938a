"""Data sets: digits split, safetensors files, first-N order, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from igd_cli.data import load_dataset, same_images
from igd_cli.errors import IgdError

from .conftest import SHARED_DATA, cifar_safetensors, digits_safetensors


def test_digits_split_is_deterministic_and_disjoint():
    train, test = load_dataset("digits", "train").all(), load_dataset("digits", "test").all()
    assert len(train.y) + len(test.y) == 1797 and len(test.y) == 450
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    again = load_dataset("digits", "test").all()
    assert torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    train_rows = {tuple(r.tolist()) for r in (train.x.flatten(1) * 255).round().to(torch.uint8)}
    test_rows = [tuple(r.tolist()) for r in (test.x.flatten(1) * 255).round().to(torch.uint8)]
    # a handful of digits images are exact duplicates in the source data; nearly all test rows are unseen
    assert sum(r in train_rows for r in test_rows) < 5
    assert set(test.y.tolist()) == set(range(10))


def test_first_n_in_order_and_batches():
    full = load_dataset("digits", "test").all()
    first = load_dataset("digits", "test", n=37)
    assert len(first) == 37
    got = list(first.batches(10))
    assert [len(b.y) for b in got] == [10, 10, 10, 7]
    assert torch.equal(torch.cat([b.x for b in got]), full.x[:37])
    assert torch.equal(torch.cat([b.index for b in got]), torch.arange(37))


def test_safetensors_dataset(tmp_path):
    path = cifar_safetensors(tmp_path, n=12)
    ds = load_dataset(str(path), "test", n=5)
    b = ds.all()
    assert b.x.shape == (5, 3, 32, 32) and b.y.tolist() == [0, 1, 2, 3, 4]
    assert ds.classes[:2] == ["class0", "class1"]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert torch.equal((b.x * 255).round().to(torch.uint8), fh.get_tensor("x")[:5])


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-test-846.safetensors").exists(), reason="needs ../shared/data")
def test_shared_cifar10_file():
    ds = load_dataset(str(SHARED_DATA / "cifar10-test-846.safetensors"), "test")
    assert len(ds) == 846 and ds.classes[0] == "airplane"


def test_dataset_errors(tmp_path):
    with pytest.raises(IgdError, match="unknown"):
        load_dataset("svhn", "test")
    with pytest.raises(IgdError, match="no such file"):
        load_dataset(str(tmp_path / "none.safetensors"), "test")
    with pytest.raises(IgdError, match="fewer than"):
        load_dataset("digits", "test", n=10_000)
    with pytest.raises(IgdError, match="at least 1"):
        load_dataset("digits", "test", n=0)
    with pytest.raises(IgdError, match="--split"):
        load_dataset("digits", "val")
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.rand(3, 1, 8, 8), "y": torch.zeros(3, dtype=torch.int64)}, str(bad))
    with pytest.raises(IgdError, match="uint8"):
        load_dataset(str(bad), "test")
    nolabel = tmp_path / "nolabel.safetensors"
    save_file({"x": torch.zeros(3, 1, 8, 8, dtype=torch.uint8)}, str(nolabel),
              metadata={"classes": json.dumps(["a"])})
    with pytest.raises(IgdError, match="needs tensors x"):
        load_dataset(str(nolabel), "test")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    with pytest.raises(IgdError, match="not a readable"):
        load_dataset(str(junk), "test")


def test_cifar_offline_error_names_the_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("IGD_OFFLINE", "1")
    with pytest.raises(IgdError, match=r"cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", "test", data_dir_arg=tmp_path)


def test_same_images(tmp_path):
    """Files have no splits: one file (by path or content) is the same images whatever split was asked;
    named data sets differ by split."""
    a = cifar_safetensors(tmp_path, n=12)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(a.read_bytes())
    (tmp_path / "other").mkdir()
    other = cifar_safetensors(tmp_path / "other", n=12, seed=1)  # same size, other pixels
    assert same_images(load_dataset(str(a), "train", 3), load_dataset(str(a), "test"))
    assert same_images(load_dataset(str(a), "train"), load_dataset(str(copy), "test"))
    assert not same_images(load_dataset(str(a), "train"), load_dataset(str(other), "test"))
    assert not same_images(load_dataset("digits", "train"), load_dataset("digits", "test"))
    assert same_images(load_dataset("digits", "test", 5), load_dataset("digits", "test"))
    assert not same_images(load_dataset("digits", "test"), load_dataset(str(digits_safetensors(tmp_path)), "test"))
    assert load_dataset(str(a), "train").wording() == f"12 images of {a}"
    assert load_dataset("digits", "train", 7).wording() == "7 training images of digits"
