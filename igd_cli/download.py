"""Filling igd's caches (zoo checkpoints, data sets, weights) once and safely, from several processes at once.

A cache entry (a file or a folder) is produced under a temporary name in its own folder, checked, and renamed
into place, all while holding an exclusive ``flock`` on ``ENTRY.lock`` (``igd_cli.locks.entry_lock``): a process
that loads the entry either finds it complete or waits for the one filling it, and a process killed midway leaves
only a temporary name behind (removed by the next fill), never a partial entry under the real name. ``IGD_MIRROR`` (or
``igd fetch --mirror``) points the downloads at a local mirror (``http(s)://`` or ``file://``) laid out as
``MIRROR/models/<dataset>/<threat model>/<name>.pt`` and ``MIRROR/data/<archive>``.

>>> download("file:///srv/mirror/data/cifar-10-python.tar.gz", Path("data/cifar-10-python.tar.gz"))  # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from . import locks
from .errors import IgdError

CHUNK = 1 << 20
GDRIVE_HOST = "drive.google.com"  # RobustBench checkpoints are fetched with gdown


class NotOneFile(IgdError):
    """A zoo entry stored as several files (an ensemble): robustbench fetches its parts itself."""


def mirror() -> str | None:
    """The mirror base URL (``IGD_MIRROR``), without a trailing slash, or None."""
    m = os.environ.get("IGD_MIRROR", "").strip()
    return m.rstrip("/") or None


@contextlib.contextmanager
def entry_lock(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``DEST.lock`` (next to the entry; in ``IGD_LOCK_DIR`` when set) while the entry
    is checked or filled."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locks.entry_lock(dest.with_name(dest.name + ".lock"), str(dest)):
        yield


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def fill(dest: Path, produce: Callable[[Path], None], check: Callable[[Path], None] | None = None) -> bool:
    """Make the cache entry ``dest`` exist, complete; True when this call filled it, False when it was there.

    ``produce(tmp)`` writes the entry (a file or a folder) at ``tmp``, in ``dest``'s folder; ``check(tmp)`` may
    raise to refuse it. Only a produced and checked entry is renamed to ``dest``; on any failure nothing is left.
    """
    dest = Path(dest)
    if dest.exists():
        return False
    with entry_lock(dest):
        if dest.exists():  # filled by another process while this one waited for the lock
            return False
        for stale in dest.parent.glob(f".{dest.name}.*.partial"):  # left by a process killed midway
            _remove(stale)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.partial")
        try:
            produce(tmp)
            if check is not None:
                check(tmp)
            os.replace(tmp, dest)
        finally:
            _remove(tmp)
    return True


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_url(url: str, out: Path, timeout: float = 60.0) -> None:
    """Copy ``url`` (``http(s)://`` or ``file://``) to ``out``, complete and synced, or raise ``OSError``."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(out, "wb") as fh:
        expected = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        n = 0
        for chunk in iter(lambda: resp.read(CHUNK), b""):
            fh.write(chunk)
            n += len(chunk)
        if expected is not None and int(expected) != n:
            raise OSError(f"{url}: {n} of {expected} bytes received")
        fh.flush()
        os.fsync(fh.fileno())


def download(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None,
             offline: str | None = None) -> bool:
    """Fill ``dest`` from ``url`` (see :func:`fill`), checked against ``md5``/``sha256`` when given.

    True when downloaded now, False when already there. A network failure is one ``IgdError`` line: ``offline``
    (what to place where) when given, else the URL and the reason; a wrong checksum is one line too.
    """
    def produce(tmp: Path) -> None:
        if os.environ.get("IGD_OFFLINE") == "1":
            raise IgdError(offline or f"{url}: offline (IGD_OFFLINE=1)")
        try:
            fetch_url(url, tmp)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise IgdError(offline or f"cannot download {url}: {' '.join(str(reason).split())[:200]}") from exc

    def check(tmp: Path) -> None:
        for algo, want in (("md5", md5), ("sha256", sha256)):
            if want is not None and not file_digest(tmp, algo).startswith(want.lower()):
                raise IgdError(f"{url}: the downloaded file's {algo} is not {want} (corrupt download or wrong "
                               f"file): nothing was written to {dest}")

    return fill(dest, produce, check)


# --- what igd caches -----------------------------------------------------------------------------------

def zoo_checkpoint_fill(name: str, dataset: str, threat_model: str, path: Path) -> bool:
    """Fill the RobustBench checkpoint at ``path`` (``$IGD_HOME/models/<ds>/<tm>/<name>.pt``) once.

    From the mirror when set, else with robustbench's own Google Drive download, into a temporary file that is
    loaded (``torch.load``) before it is renamed into place. Offline: one line naming the file to place.
    """
    offline = f"cannot download RobustBench model {name} (offline?): place its checkpoint at {path}"
    m = mirror()
    if m is not None:
        return download(f"{m}/models/{dataset}/{threat_model}/{name}.pt", path, offline=offline)
    from ._compat import import_robustbench, reachable

    def produce(tmp: Path) -> None:
        rb = import_robustbench()
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

        entry = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)][name]
        gid = entry.get("gdrive_id")
        if not gid or isinstance(gid, list):
            raise NotOneFile(f"RobustBench model {name} is not one checkpoint file: let robustbench fetch it "
                           f"(igd rank/attack on a node with network) or place it at {path}")
        if os.environ.get("IGD_OFFLINE") == "1" or not reachable(GDRIVE_HOST):
            raise IgdError(offline)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # robustbench prints on stdout, which is --json's
                rb.utils.download_gdrive_new(gid, str(tmp))
        except Exception as exc:  # gdown/requests errors
            raise IgdError(offline) from exc

    def check(tmp: Path) -> None:
        import torch

        try:
            torch.load(tmp, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise IgdError(f"the download of RobustBench model {name} is not a checkpoint "
                           f"({' '.join(str(exc).split())[:120]}): nothing was written to {path}") from exc

    return fill(path, produce, check)


def torchvision_archive_fill(cls, root: Path) -> bool:
    """Fill torchvision's CIFAR-10/100 folder (``root/<base_folder>``) once: the archive is downloaded (checked
    against torchvision's md5), extracted beside it under a temporary name, every file's md5 checked, renamed."""
    from torchvision.datasets.utils import check_integrity, extract_archive

    archive = root / Path(cls.url).name
    dest = root / cls.base_folder
    offline = (f"--dataset {'cifar10' if 'cifar-10-' in cls.url else 'cifar100'}: not in {root} and cannot be "
               f"downloaded (offline?): place {archive.name} (or its extracted {cls.base_folder}/) there or pass "
               f"--data-dir")
    m = mirror()
    download(f"{m}/data/{archive.name}" if m else cls.url, archive, md5=cls.tgz_md5, offline=offline)

    def produce(tmp: Path) -> None:
        stage = tmp.with_name(tmp.name + ".x")
        _remove(stage)
        try:
            extract_archive(str(archive), str(stage))
            os.replace(stage / cls.base_folder, tmp)
        finally:
            _remove(stage)

    def check(tmp: Path) -> None:
        for filename, md5 in [*cls.train_list, *cls.test_list]:
            if not check_integrity(str(tmp / filename), md5):
                raise IgdError(f"{archive}: {filename} is missing or corrupt after extraction (remove the archive "
                               f"and fetch again)")

    return fill(dest, produce, check)
