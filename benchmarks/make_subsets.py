"""Make the two CIFAR-10 tensor files the benchmarks and the ResNet-18 figures use, from the official data set.

    igd fetch --dataset cifar10                 # once: torchvision's CIFAR-10 into the data folder
    python benchmarks/make_subsets.py           # writes both files into the same folder

- ``cifar10-test-846.safetensors``: the first 846 images of the official test batch, in order;
- ``cifar10-train-4660.safetensors``: the first 932 images of each of the five training batches, in order.

Each is an igd tensor file (docs/own-model-and-data.md): ``x`` uint8 N×3×32×32, ``y`` int64, metadata ``classes``
(the data set's class names) and ``source``. The bytes are always the same, so the files' sha256 — which igd uses
as their identity, and which the results files under benchmarks/results/ record — is the one in ``SUBSETS``;
the script says whether each file it wrote has it. ``--data-dir DIR`` reads CIFAR-10 from ``DIR`` (default: igd's
data folder, ``$IGD_DATA_DIR`` else ``$IGD_HOME/data``); ``--out DIR`` writes there instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import struct
import sys
from pathlib import Path
from typing import NoReturn, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import HELP, SUBSETS, Subset, data_dir  # noqa: E402

FOLDER = "cifar-10-batches-py"  # torchvision's CIFAR10.base_folder: the official python archive, extracted


def official_batch(folder: Path, name: str) -> dict:
    """One official batch file, checked against torchvision's md5 of it: ``{b"data": (10000, 3072) uint8,
    b"labels": [...]}``, or ``{b"label_names": [...]}`` for ``batches.meta``."""
    import torchvision
    from torchvision.datasets.utils import check_integrity

    cls = torchvision.datasets.CIFAR10
    md5 = dict([*cls.train_list, *cls.test_list])[name] if name != cls.meta["filename"] else cls.meta["md5"]
    path = folder / name
    if not path.is_file():
        fail(f"{path} not found: run `igd fetch --dataset cifar10` (or pass --data-dir DIR, the folder holding "
             f"{FOLDER}/)")
    if not check_integrity(str(path), md5):
        fail(f"{path} is not the official CIFAR-10 file (its md5 differs from torchvision's): remove {FOLDER}/ "
             f"and run `igd fetch --dataset cifar10` again")
    with open(path, "rb") as f:  # the official format; torchvision's CIFAR10 reads it the same way
        return pickle.load(f, encoding="bytes")


def fail(msg: str) -> NoReturn:
    """One ``error:`` line on stderr, exit 2 (igd's rule for bad input)."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def subset_tensors(folder: Path, subset: Subset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The subset's images (N, 3, 32, 32) uint8, labels (N,) int64 and class names.

    Read from the batch files rather than through torchvision's CIFAR10, which joins the five training batches
    into one array: the training subset is defined per batch (its first ``per_batch`` images)."""
    xs, ys = [], []
    for name in subset.batches:
        batch = official_batch(folder, name)
        data = np.asarray(batch[b"data"], dtype=np.uint8)  # row = 1024 red, 1024 green, 1024 blue: C×H×W
        xs.append(data[:subset.per_batch].reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"][:subset.per_batch], dtype=np.int64))
    classes = [c.decode() for c in official_batch(folder, "batches.meta")[b"label_names"]]
    return np.concatenate(xs), np.concatenate(ys), classes


def tensor_file_bytes(x: np.ndarray, y: np.ndarray, metadata: dict[str, str]) -> bytes:
    """A safetensors file of ``y`` then ``x`` with ``metadata`` in the given key order.

    Written by hand rather than with ``safetensors.torch.save_file``: that writer keeps the metadata in a hash
    map, so the keys' order — and the file's sha256, its identity in igd — changes from one run to the next."""
    yb, xb = np.ascontiguousarray(y, dtype="<i8").tobytes(), np.ascontiguousarray(x, dtype=np.uint8).tobytes()
    header = {"__metadata__": metadata,
              "y": {"dtype": "I64", "shape": list(y.shape), "data_offsets": [0, len(yb)]},
              "x": {"dtype": "U8", "shape": list(x.shape), "data_offsets": [len(yb), len(yb) + len(xb)]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to a multiple of 8 bytes
    return struct.pack("<Q", len(text)) + text + yb + xb


def make(subset: Subset, folder: Path, out: Path) -> str:
    """Write ``subset`` from the CIFAR-10 batch files in ``folder`` to ``out`` (atomically); its sha256."""
    x, y, classes = subset_tensors(folder, subset)
    data = tensor_file_bytes(x, y, {"classes": json.dumps(classes), "source": subset.source,
                                    "layout": "x: uint8 NCHW in [0,255]; y: int64 class index"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return hashlib.sha256(data).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None, help=HELP + f"; CIFAR-10 is read from its {FOLDER}/")
    ap.add_argument("--out", type=Path, default=None, help="folder to write the files to (default: the data folder)")
    a = ap.parse_args(argv)
    folder = data_dir(a.data_dir) / FOLDER
    out = a.out if a.out is not None else data_dir(a.data_dir)
    same = True
    for name, subset in SUBSETS.items():
        digest = make(subset, folder, out / name)
        match = digest == subset.sha256
        same &= match
        verdict = "the benchmarks' file" if match else f"differs from the benchmarks' file, {subset.sha256}"
        print(f"{out / name}: {subset.source}; sha256 {digest} ({verdict})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
