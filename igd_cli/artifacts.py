"""The only module that reads or writes safetensors files.

Every igd artifact is a safetensors file whose metadata values are JSON-encoded strings. Standard keys:
``kind``, ``format_version``, ``igd_version``, ``created``, and, where they apply, ``model_fingerprint``,
``model``, ``layer``, ``dataset``, ``split``, ``method``, ``params``. Writes are atomic (temporary file in
the same folder, fsync, rename) so that a killed job never leaves a half-written artifact behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from . import __version__
from .errors import IgdError
from .home import digest_store

FORMAT_VERSION = 1

#: kind -> tensors every artifact of that kind must hold.
KINDS: dict[str, tuple[str, ...]] = {
    "model": (),
    "dataset": ("x", "y"),
    "importance": ("importance",),
    "importance-shard": ("importance",),
    "clip-cache": ("image_embeddings", "text_embeddings"),
    "mask": ("mask",),
    "adversarial": ("x_adv", "y", "index"),
    "eval-report": ("correct",),
}
#: kinds whose artifact may hold one tensor per layer instead of KINDS' tensors: those named in metadata ``layers``
#: (a mask of several layers)
PER_LAYER_KINDS = ("mask",)


def required_tensors(kind: str, meta: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensors an artifact of ``kind`` with metadata ``meta`` must hold."""
    layers = meta.get("layers")
    if kind in PER_LAYER_KINDS and isinstance(layers, list) and layers:
        return tuple(str(layer) for layer in layers)
    return KINDS[kind]


@dataclass
class Artifact:
    """Tensors and decoded metadata of one safetensors file."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    #: sha256 of the file's bytes as read (the file is opened once: its identity and its tensors come from the
    #: same bytes)
    sha256: str | None = None

    @property
    def kind(self) -> str | None:
        return self.meta.get("kind")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _encode_meta(meta: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): json.dumps(v, sort_keys=True) for k, v in meta.items()}


def _decode_meta(raw: Mapping[str, str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (raw or {}).items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v  # metadata written by other tools: keep the plain string
    return out


def save_artifact(path: str | os.PathLike, kind: str, tensors: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``tensors`` with standard provenance metadata to ``path`` atomically; returns the path."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    missing = [t for t in required_tensors(kind, meta or {}) if t not in tensors]
    if missing:
        raise ValueError(f"a {kind} artifact needs tensors {missing}")
    path = Path(path)
    if path.is_dir():
        raise IgdError(f"{path}: is a directory, expected a file to write")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    full_meta = {"kind": kind, "format_version": FORMAT_VERSION, "igd_version": __version__, "created": now_iso()}
    full_meta.update(dict(meta or {}))
    full_meta["tensors_sha256"] = tensors_digest(cpu)
    data = _st_save(cpu, metadata=_encode_meta(full_meta))
    atomic_write_bytes(path, data)
    return path


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes: stored in each artifact at write time and checked
    whenever it is read, so a flipped bit that leaves the header intact is refused, not reused."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        # mkstemp makes the file owner-only (0600); give it the mode a plain open() would (0666 less the umask),
        # so that a run folder shared by a group on a cluster stays readable by it
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Decoded metadata of a safetensors file without reading its tensors."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return _decode_meta(fh.metadata())
    except (SafetensorError, OSError, ValueError) as exc:
        raise IgdError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc


def tensor_info(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Shape and dtype of every tensor in a safetensors file, without loading the data."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            info = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                info[name] = {"shape": list(sl.get_shape()), "dtype": str(sl.get_dtype())}
            return info
    except (SafetensorError, OSError, ValueError) as exc:
        raise IgdError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc


def load_artifact(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                  fingerprint: str | None = None, layer: str | None = None) -> Artifact:
    """Read an artifact (its bytes once: tensors, metadata and the file's sha256) and check it: its kind, required
    tensors, the digest of its tensors, and (when given) model fingerprint and layer.

    Any problem raises :class:`IgdError` with one line naming the file and what is wrong.
    """
    path = _existing(path)
    try:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        meta = _decode_meta(header.get("__metadata__"))
        tensors = _st_load(raw)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IgdError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc
    art = Artifact(path, tensors, meta, hashlib.sha256(raw).hexdigest())
    check_artifact(art, kind=kind, fingerprint=fingerprint, layer=layer)
    want = meta.get("tensors_sha256")
    if isinstance(want, str) and tensors_digest(tensors) != want:
        raise IgdError(f"{path}: its tensors do not match the digest written with them (the file is corrupted); "
                       f"delete it and recompute")
    return art


def intact(path: str | os.PathLike) -> bool:
    """Whether an artifact reads back whole and its tensors match the digest written with them (what every reuse
    of a finished artifact checks before trusting its metadata)."""
    try:
        load_artifact(path)
    except IgdError:
        return False
    return True


def check_artifact(art: Artifact, kind: str | tuple[str, ...] | None = None, fingerprint: str | None = None,
                   layer: str | None = None) -> None:
    """Validate kind, format version, required tensors, fingerprint and layer of a loaded artifact."""
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if art.kind not in kinds:
            got = art.kind if art.kind is not None else "not an igd artifact"
            raise IgdError(f"{art.path}: expected a {' or '.join(kinds)} artifact, found {got}")
        version = art.meta.get("format_version")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise IgdError(f"{art.path}: format version {version} is newer than this igd ({__version__}) reads")
        missing = [t for t in required_tensors(art.kind, art.meta) if t not in art.tensors]
        if missing:
            raise IgdError(f"{art.path}: {art.kind} artifact lacks tensor(s) {', '.join(missing)}")
    if fingerprint is not None:
        have = art.meta.get("model_fingerprint")
        if have != fingerprint:
            raise IgdError(f"{art.path}: made for model fingerprint {have} ({art.meta.get('model', '?')}), "
                           f"not for this model ({fingerprint})")
    if layer is not None:
        have = art.meta.get("layer")
        if have != layer:
            raise IgdError(f"{art.path}: made for layer {have!r}, not {layer!r}")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (used to tie a mask to the importance file it came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_file_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, remembered under :func:`stat_key` in ``$IGD_HOME/cache/sha256.json`` so that a large
    file is read once, not by every command that names it; a changed file is hashed anew."""
    p = Path(path).resolve()
    key = stat_key(p)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    store = digest_store()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    digest = known.get(key) if isinstance(known, dict) else None
    if not isinstance(digest, str):
        digest = file_sha256(p)
        if not isinstance(known, dict):
            known = {}
        known[key] = digest
        try:  # a cache: a concurrent writer may win, and a read-only home only costs a re-read next time
            atomic_write_bytes(store, json.dumps(known, sort_keys=True).encode())
        except OSError:
            pass
    _SHA_MEMO[key] = digest
    return digest


_SHA_MEMO: dict[str, str] = {}


def stat_key(path: Path) -> str:
    """What tells a file's versions apart without reading it: resolved path, size, mtime, ctime (ns) and inode.
    Size and mtime alone are not enough: ``cp -p``, ``rsync -t`` and ``tar x`` rewrite a file and put its old mtime
    back; none of them can put back the ctime (set by the kernel on every write), and those that write a new file
    give it another inode."""
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from ``.pt/.pth`` with ``weights_only=True`` (no pickle code)."""
    path = _existing(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise IgdError(f"{path}: not a readable safetensors file ({_short(exc)})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad/unsafe pickles
        # torch's own message is a paragraph about the weights_only default: say what it means in one line
        text = str(exc)
        if "Unsupported global" in text or "safe_globals" in text:
            reason = "it holds code or objects other than tensors, which weights_only=True refuses"
        elif "WeightsUnpickler" in text or "invalid load key" in text or "zip" in text.lower():
            reason = "not a PyTorch checkpoint"
        else:
            reason = _short(exc)
        raise IgdError(f"{path}: cannot read as a weights-only PyTorch checkpoint ({reason})") from exc
    for key in ("state_dict", "model_state_dict", "model", "net"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise IgdError(f"{path}: does not hold a state dict of tensors")
    return obj


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise IgdError(f"{path}: no such file")
    if path.is_dir():
        raise IgdError(f"{path}: is a directory, expected a file")
    return path


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__
