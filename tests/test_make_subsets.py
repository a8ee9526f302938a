"""benchmarks/make_subsets.py makes the benchmarks' CIFAR-10 tensor files from the official batch files: the right
images in the right order, the tensor-file format igd reads, the same bytes every run — and, built from the
content of the real files, exactly the real files (skipped where they are absent)."""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from .conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import make_subsets  # noqa: E402
from _data import SUBSETS  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_batches(folder: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A torchvision-layout CIFAR-10 folder (``cifar-10-batches-py/``) holding ``batches`` in the official pickle
    format: ``{b"data": (n, 3072) uint8, b"labels": [...]}`` per batch, ``batches.meta`` with the class names."""
    d = folder / make_subsets.FOLDER
    d.mkdir(parents=True)
    for name, (x, y) in batches.items():
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                         b"data": x.reshape(len(x), -1), b"filenames": [b"f.png"] * len(x)}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}, f)
    return folder


def random_batches(n_train: int = 940, n_test: int = 850) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    g = np.random.default_rng(0)
    sizes = {**{f"data_batch_{i}": n_train for i in range(1, 6)}, "test_batch": n_test}
    return {k: (g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, n)) for k, n in sizes.items()}


@pytest.fixture
def official_md5_unchecked(monkeypatch):
    """The fake batch files are not the official ones: accept them (the md5 check has its own test below)."""
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda path, md5=None: True)


def read(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with safe_open(str(path), "np") as f:
        return f.get_tensor("x"), f.get_tensor("y"), f.metadata()


def test_the_subsets_are_the_first_images_of_each_batch_in_order(tmp_path, official_md5_unchecked, capsys):
    batches = random_batches()
    data = write_batches(tmp_path / "data", batches)
    assert make_subsets.main(["--data-dir", str(data), "--out", str(tmp_path / "out")]) == 1  # not the real files
    out = capsys.readouterr().out
    assert out.count("differs from the benchmarks' file") == 2

    x, y, meta = read(tmp_path / "out" / "cifar10-test-846.safetensors")
    assert x.dtype == np.uint8 and x.shape == (846, 3, 32, 32) and y.dtype == np.int64
    assert np.array_equal(x, batches["test_batch"][0][:846]) and np.array_equal(y, batches["test_batch"][1][:846])
    assert json.loads(meta["classes"]) == CLASSES and meta["source"] == SUBSETS["cifar10-test-846.safetensors"].source

    x, y, meta = read(tmp_path / "out" / "cifar10-train-4660.safetensors")
    assert x.shape == (4660, 3, 32, 32)
    for i in range(5):  # images 932·i … 932·(i+1)−1 are the first 932 of data_batch_{i+1}
        bx, by = batches[f"data_batch_{i + 1}"]
        assert np.array_equal(x[932 * i:932 * (i + 1)], bx[:932]) and np.array_equal(y[932 * i:932 * (i + 1)], by[:932])

    # igd reads it as a tensor file, images in [0, 1]
    from igd_cli.data import load_dataset

    ds = load_dataset(str(tmp_path / "out" / "cifar10-train-4660.safetensors"), "train", 3)
    assert ds.classes == CLASSES and np.allclose(ds.all().x.numpy() * 255, batches["data_batch_1"][0][:3])


def test_the_same_bytes_every_run(tmp_path, official_md5_unchecked):
    """safetensors' own writer orders the metadata keys at random: the file (and its sha256, igd's identity of it)
    would change between runs."""
    data = write_batches(tmp_path / "data", random_batches())
    digests = set()
    for run in range(4):
        make_subsets.main(["--data-dir", str(data), "--out", str(tmp_path / f"out{run}")])
        digests.add(hashlib.sha256((tmp_path / f"out{run}" / "cifar10-test-846.safetensors").read_bytes()).digest())
    assert len(digests) == 1


def test_a_file_that_is_not_the_official_one_is_refused(tmp_path, capsys):
    data = write_batches(tmp_path / "data", random_batches())  # md5 checked for real: these are not CIFAR-10's
    with pytest.raises(SystemExit) as e:
        make_subsets.main(["--data-dir", str(data), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "not the official CIFAR-10 file" in err and "igd fetch --dataset cifar10" in err


def test_absent_cifar10_is_one_line_saying_how_to_get_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_subsets.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "run `igd fetch --dataset cifar10`" in err
    assert not (tmp_path / "out").exists()  # nothing written, no folder made


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-test-846.safetensors").exists(), reason="needs the real data files")
def test_rebuilt_from_their_content_the_real_files_come_back_bit_for_bit(tmp_path, official_md5_unchecked):
    """The official batch files cannot be downloaded here; their images that the subsets hold can be put back into
    the official layout (with other images after them), and the recipe must then write the real files exactly."""
    real = {name: read(SHARED_DATA / name) for name in SUBSETS}
    filler = np.zeros((5, 3, 32, 32), np.uint8), np.zeros(5, np.int64)
    x, y, _ = real["cifar10-test-846.safetensors"]
    batches = {"test_batch": (np.concatenate([x, filler[0]]), np.concatenate([y, filler[1]]))}
    x, y, _ = real["cifar10-train-4660.safetensors"]
    for i in range(5):
        batches[f"data_batch_{i + 1}"] = (np.concatenate([x[932 * i:932 * (i + 1)], filler[0]]),
                                          np.concatenate([y[932 * i:932 * (i + 1)], filler[1]]))
    data = write_batches(tmp_path / "data", batches)
    assert make_subsets.main(["--data-dir", str(data), "--out", str(tmp_path / "out")]) == 0
    for name, subset in SUBSETS.items():
        made = (tmp_path / "out" / name).read_bytes()
        assert made == (SHARED_DATA / name).read_bytes() and hashlib.sha256(made).hexdigest() == subset.sha256
