"""Write any torchvision data set (or any sequence of (image, label) pairs) as an igd tensor file.

An igd tensor file is a safetensors file with tensor ``x`` (uint8, N×C×H×W), tensor ``y`` (int64, N) and metadata
``classes`` (a JSON list of class names, index = label); ``--dataset FILE.safetensors`` reads it (docs/own-model-and-data.md).

    python examples/make_tensor_file.py CIFAR10 --root data --split test --out cifar10-test.safetensors
    python examples/make_tensor_file.py CIFAR10 --root data --split train --n 5000 --out cifar10-train-5000.safetensors

From Python, any data set whose items are (PIL image | uint8 array | float tensor in [0, 1], label):

    to_tensor_file(torchvision.datasets.FakeData(16, (3, 32, 32), 10), "fake.safetensors")
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save_file


def as_uint8_chw(image: Any) -> torch.Tensor:
    """One image as uint8 C×H×W: a PIL image or an H×W(×C) uint8 array as stored, a float tensor in [0, 1] scaled
    by 255 and rounded."""
    if isinstance(image, torch.Tensor):
        t = image if image.dtype == torch.uint8 else (image.clamp(0, 1) * 255).round().to(torch.uint8)
        return t if t.ndim == 3 else t.unsqueeze(0)
    a = np.array(image)  # a PIL image becomes H×W or H×W×C uint8 (a copy: writable)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, found {a.dtype} (pass a float tensor in [0, 1] instead)")
    a = a[:, :, None] if a.ndim == 2 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def to_tensor_file(dataset: Sequence, out: str | Path, n: int | None = None,
                   classes: Sequence[str] | None = None) -> Path:
    """Write the first ``n`` items of ``dataset`` (all when None) to ``out``; ``classes`` defaults to
    ``dataset.classes`` when the data set has them, else "0", "1", ….
    """
    count = len(dataset) if n is None else min(n, len(dataset))
    xs, ys = [], []
    for i in range(count):
        image, label = dataset[i]
        xs.append(as_uint8_chw(image))
        ys.append(int(label))
    x, y = torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
    names = list(classes if classes is not None else getattr(dataset, "classes", None) or
                 [str(c) for c in range(int(y.max()) + 1)])
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    save_file({"x": x.contiguous(), "y": y}, str(tmp), metadata={"classes": json.dumps(names)})
    tmp.replace(out)  # atomic: a killed run never leaves a half-written file under the real name
    return out


def main(argv: Sequence[str] | None = None) -> None:
    import torchvision

    p = argparse.ArgumentParser(description="a torchvision data set as an igd tensor file")
    p.add_argument("dataset", help="a torchvision.datasets class with a train= flag: CIFAR10, CIFAR100, MNIST, "
                                   "FashionMNIST, SVHN (split=) …")
    p.add_argument("--root", default="data", help="where torchvision keeps (or downloads) the data set")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--n", type=int, default=None, help="the first N images (default: all)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    cls = getattr(torchvision.datasets, a.dataset)
    try:
        ds = cls(a.root, train=a.split == "train", download=True)
    except TypeError:  # SVHN and a few others take split= instead of train=
        ds = cls(a.root, split=a.split, download=True)
    path = to_tensor_file(ds, a.out, a.n)
    print(f"{path}: {min(a.n or len(ds), len(ds))} images of {a.dataset} ({a.split})")


if __name__ == "__main__":
    main()
