"""Data sets (``--dataset``, ``--split``): always the first N images of a split, in the data set's order.

Images come out as float32 NCHW in [0, 1] with int64 labels and their positions in the split, in batches,
so probe sets larger than memory stream with memory bounded by the batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch

from ._compat import reachable
from .errors import IgdError
from .home import data_home

Split = Literal["train", "test"]

DIGITS_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Batch:
    x: torch.Tensor  # float32 (B, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (B,)
    index: torch.Tensor  # int64 (B,): positions in the split


class ImageSet:
    """The first ``n`` images of a split. ``get(i, j)`` returns images i..j-1 as float in [0, 1].

    ``file`` is set for a tensor file, which has no splits: every split of it is the same images.

    Example::

        images = load_dataset("digits", "test", 64)
        batch = images.get(0, 8)                     # batch.x (8, 1, 8, 8), batch.y, batch.index = 0..7
        len(images), images.classes, images.identity()
    """

    def __init__(self, name: str, split: str, classes: Sequence[str], n: int,
                 getter: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], source: str = "",
                 file: Path | None = None, digest: Callable[[], str] | None = None):
        self.name, self.split, self.classes, self.n, self._get, self.source = name, split, list(classes), n, getter, source
        self.file = file
        self._digest = digest
        self._digest_value: str | None = None

    def source_digest(self) -> str:
        """sha256 of the contents of the split this set is the first n images of (a tensor file: the file's bytes,
        cached by path, size, mtime, ctime and inode; a named data set: its files or arrays), computed once. What
        identifies the images in every cache and merge: a file rewritten in place gets another digest (also when
        its old mtime is put back), a copied or moved one the same."""
        if self._digest_value is None:
            self._digest_value = self._digest() if self._digest is not None else _array_digest(self, 0, self.n)
        return self._digest_value

    def identity(self) -> dict:
        """The images a result was computed on, as caches and merges compare them: the source's contents and how
        many of its first images (not the file's path, not the split's name)."""
        return {"images": self.source_digest(), "n": self.n}

    def __len__(self) -> int:
        return self.n

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def get(self, start: int, stop: int) -> Batch:
        stop = min(stop, self.n)
        x, y = self._get(start, stop)
        return Batch(x, y, torch.arange(start, stop, dtype=torch.int64))

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
        stop = self.n if stop is None else min(stop, self.n)
        for i in range(start, stop, batch_size):
            yield self.get(i, min(i + batch_size, stop))

    def all(self) -> Batch:
        return self.get(0, self.n)

    def describe(self) -> dict:
        return {"dataset": self.name, "split": self.split, "n": self.n, "source": self.source}

    def wording(self) -> str:
        """How to name these images to a person: ``200 test images of cifar10``, ``64 images of FILE``."""
        split = "" if self.file is not None else {"train": "training ", "test": "test "}.get(self.split, "")
        return f"{self.n} {split}images of {self.name}"

    def view(self, start: int, stop: int) -> "ImageSet":
        """Images start..stop-1 as a set of their own (an evaluation shard) whose batches keep their positions
        in the split in ``index``, so per-example results can be put back in place."""
        if not 0 <= start < stop <= self.n:
            raise IgdError(f"images {start}..{stop - 1}: outside the {self.n} images of {self.name} ({self.split})")
        return _ImageSetView(self, start, stop)


class _ImageSetView(ImageSet):
    """Positions start..stop-1 of ``parent``: local ``get(i, j)``, absolute ``Batch.index``."""

    def __init__(self, parent: ImageSet, start: int, stop: int):
        def getter(i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
            b = parent.get(start + i, start + j)
            return b.x, b.y

        super().__init__(parent.name, parent.split, parent.classes, stop - start, getter, parent.source, parent.file,
                         digest=parent.source_digest)
        self.parent, self.start, self.stop = parent, start, stop

    def get(self, start: int, stop: int) -> Batch:
        stop = min(stop, self.n)
        b = self.parent.get(self.start + start, self.start + stop)
        return Batch(b.x, b.y, b.index)

    def describe(self) -> dict:
        return {**self.parent.describe(), "positions": [self.start, self.stop]}

    def identity(self) -> dict:
        """The parent's images by content, and which of them: images start..stop-1 (a view from 0 is the first n,
        as the parent set of n would be)."""
        return {**super().identity(), **({"start": self.start} if self.start else {})}


def data_dir(arg: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, else ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``."""
    if arg:
        return Path(arg).expanduser()
    if os.environ.get("IGD_DATA_DIR"):
        return Path(os.environ["IGD_DATA_DIR"]).expanduser()
    return data_home()


def load_dataset(name: str, split: Split = "test", n: int | None = None,
                 data_dir_arg: str | os.PathLike | None = None) -> ImageSet:
    """Resolve ``--dataset`` into the first ``n`` images (all when ``n`` is None) of ``split``.

    Example::

        images = load_dataset("digits", "test", 256)        # "cifar10", ...; or a tensor file "PATH.safetensors"
        for batch in images.batches(256):
            batch.x, batch.y, batch.index                    # float32 in [0, 1], labels, positions in the split
    """
    if split not in ("train", "test"):
        raise IgdError(f"--split {split}: expected train or test")
    if n is not None and n < 1:
        raise IgdError(f"the number of images must be at least 1, got {n}")
    loader = DATASETS.get(name)
    if loader is None:
        if name.endswith(".safetensors") or os.sep in name:
            loader = _safetensors_set
        else:
            raise IgdError(f"--dataset {name}: unknown (choose from {', '.join(DATASETS)} or a PATH.safetensors)")
    ds = loader(name, split, data_dir(data_dir_arg))
    if n is not None:
        if n > ds.n:
            raise IgdError(f"--dataset {name} ({split}) has {ds.n} images, fewer than the {n} asked for")
        ds.n = n
    return ds


def _from_uint8(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    return t.to(torch.float32).div_(255.0)


def _digits(name: str, split: str, root: Path) -> ImageSet:
    """scikit-learn's 8x8 digits (values 0..16, stored as uint8 0..255), split 75/25 with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (n, 1, 8, 8)
    idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.25, random_state=0,
                                           stratify=d.target)
    idx = idx_train if split == "train" else idx_test
    xs, ys = torch.from_numpy(x[idx]), torch.from_numpy(d.target[idx].astype(np.int64))
    return ImageSet("digits", split, DIGITS_CLASSES, len(idx),
                    lambda i, j: (_from_uint8(xs[i:j]), ys[i:j]), "sklearn.datasets.load_digits",
                    digest=lambda: _bytes_digest(xs, ys))


def _torchvision_cifar(name: str, split: str, root: Path) -> ImageSet:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(root), train=(split == "train"), download=False)
    except RuntimeError:
        # filled once, under a lock, complete or not at all (several array tasks may start here at once)
        from .download import mirror, torchvision_archive_fill

        if mirror() is None and not (root / Path(cls.url).name).exists() and not reachable(cls.url):
            raise IgdError(f"--dataset {name}: not in {root} and cannot be downloaded (offline?): place "
                           f"{Path(cls.url).name} (or its extracted {cls.base_folder}/) there or pass --data-dir")
        torchvision_archive_fill(cls, root)
        ds = cls(str(root), train=(split == "train"), download=False)
    x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    files = [Path(ds.root) / ds.base_folder / f for f, _ in (ds.train_list if split == "train" else ds.test_list)]
    return ImageSet(name, split, list(ds.classes), len(y), lambda i, j: (_from_uint8(x[i:j]), y[i:j]),
                    f"torchvision.datasets.{cls.__name__}", digest=lambda: _files_digest(files))


def _imagenet(name: str, split: str, root: Path) -> ImageSet:
    """ImageFolder at ``root/train`` or ``root/val`` with RobustBench's preprocessing (Resize 256, crop 224)."""
    import torchvision
    from torchvision import transforms

    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise IgdError(f"--dataset imagenet: no folder {folder} (ImageNet cannot be downloaded: place the "
                       f"ImageFolder layout there or pass --data-dir)")
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    ds = torchvision.datasets.ImageFolder(str(folder), transform=tf)
    classes = _imagenet_class_names(ds.classes)

    def get(i: int, j: int):
        items = [ds[k] for k in range(i, j)]
        return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items], dtype=torch.int64)

    def digest() -> str:  # decoding every image to hash it would take minutes: name, size and mtime of each file
        h = hashlib.sha256()
        for path, label in ds.samples:
            st = os.stat(path)
            h.update(f"{Path(path).relative_to(folder)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
        return h.hexdigest()

    return ImageSet("imagenet", split, classes, len(ds), get, "torchvision.datasets.ImageFolder", digest=digest)


def _imagenet_class_names(wnids: list[str]) -> list[str]:
    """Human-readable names (torchvision's ImageNet categories) when the folder has the 1000 synsets."""
    try:
        import torchvision

        cats = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
        if len(cats) == len(wnids):
            return list(cats)
    except Exception:  # pragma: no cover
        pass
    return list(wnids)


def _safetensors_set(name: str, split: str, root: Path) -> ImageSet:
    """A safetensors file with ``x`` (uint8 NCHW) and ``y`` (int64); read lazily, slice by slice."""
    from safetensors import SafetensorError, safe_open

    path = Path(name).expanduser()
    if not path.exists():
        raise IgdError(f"--dataset {path}: no such file")
    try:
        fh = safe_open(str(path), framework="pt")
        keys = set(fh.keys())
        meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise IgdError(f"--dataset {path}: not a readable safetensors file") from exc
    if not {"x", "y"} <= keys:
        raise IgdError(f"--dataset {path}: needs tensors x (uint8 NCHW) and y (int64), found {sorted(keys)}")
    xs, ys = fh.get_slice("x"), fh.get_tensor("y").to(torch.int64)
    shape = xs.get_shape()
    if len(shape) != 4 or str(xs.get_dtype()).upper() not in ("U8", "UINT8", "TORCH.UINT8"):
        raise IgdError(f"--dataset {path}: x must be uint8 NCHW, found {xs.get_dtype()} {list(shape)}")
    if ys.ndim != 1 or ys.shape[0] != shape[0]:
        raise IgdError(f"--dataset {path}: y must be one label per image ({shape[0]}), found {list(ys.shape)}")
    try:
        classes = json.loads(meta.get("classes", "null")) or [str(c) for c in range(int(ys.max()) + 1)]
    except ValueError:
        classes = [str(c) for c in range(int(ys.max()) + 1)]
    from .artifacts import cached_file_sha256

    resolved = path.resolve()
    return ImageSet(str(path), split, classes, shape[0], lambda i, j: (_from_uint8(xs[i:j]), ys[i:j]),
                    meta.get("source", str(path)), file=resolved, digest=lambda: cached_file_sha256(resolved))


def same_images(a: ImageSet, b: ImageSet) -> bool:
    """Whether two sets start with the same images (both are first-N prefixes of their source): the same source
    contents, whatever path, name or split either was asked for (a copy of a file counts)."""
    return a.source_digest() == b.source_digest()


def _bytes_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (the digest every artifact carries of its tensors)."""
    from .artifacts import tensors_digest

    return tensors_digest({str(i): t for i, t in enumerate(tensors)})


def _array_digest(ds: ImageSet, start: int, stop: int, chunk: int = 4096) -> str:
    """sha256 of images and labels start..stop-1 read through the set (a set built without a digest of its own)."""
    h = hashlib.sha256()
    for i in range(start, stop, chunk):
        x, y = ds._get(i, min(i + chunk, stop))
        h.update(_bytes_digest(x, y).encode())
    return h.hexdigest()


def _files_digest(files: Sequence[Path]) -> str:
    from .artifacts import cached_file_sha256

    return hashlib.sha256("".join(cached_file_sha256(f) for f in files).encode()).hexdigest()


#: ``--dataset`` name -> loader(name, split, data_dir).
DATASETS: dict[str, Callable[[str, str, Path], ImageSet]] = {
    "digits": _digits,
    "cifar10": _torchvision_cifar,
    "cifar100": _torchvision_cifar,
    "imagenet": _imagenet,
}
