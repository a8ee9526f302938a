"""Shards: split work over neurons (``--neurons A:B``), resume finished pieces, and merge them back.

A shard is an artifact of kind ``<kind>-shard`` holding rows A..B-1 with ``neurons: [A, B]`` in its metadata.
:func:`merge` reads shards, checks they belong together and cover the whole range exactly once, and writes the
full artifact. Mergers are registered per shard kind in :data:`MERGERS` (importance now; adversarial sets or
evaluation reports can register theirs with :func:`register_merger` without touching the command).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .artifacts import Artifact, file_sha256, intact, load_artifact, read_metadata, save_artifact, tensor_info
from .errors import IgdError
from .provenance import comparable, difference

#: metadata that must agree for two importance shards (or a shard and a re-run) to be the same computation (igd's
#: code and the numerics as :func:`igd_cli.provenance.comparable` reads them)
IMPORTANCE_IDENTITY = ("model_fingerprint", "num_classes", "layer", "method", "n_neurons", "data_id", "params",
                       "igd_code", "numerics")


def parse_neurons(text: str | None, n: int) -> tuple[int, int]:
    """``A:B`` (either side may be empty: ``:B``, ``A:``) -> (A, B) with 0 <= A < B <= n; None -> (0, n)."""
    if text is None or text.strip() in ("", ":"):
        return 0, n
    m = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
    if not m:
        raise IgdError(f"--neurons {text!r}: expected A:B with integers 0 <= A < B <= N = {n}")
    a = int(m.group(1)) if m.group(1) else 0
    b = int(m.group(2)) if m.group(2) else n
    if not a < b:
        raise IgdError(f"--neurons {text}: A must be smaller than B")
    if b > n:
        raise IgdError(f"--neurons {text}: B = {b} exceeds the layer's N = {n} neurons")
    return a, b


def parse_shard(text: str | None, n: int) -> tuple[int, int, int, int] | None:
    """``I/N`` (I in 0..N-1) -> (I, N, start, stop): the I-th of N contiguous blocks of the n images."""
    if text is None:
        return None
    try:
        i_s, n_s = text.split("/")
        i, k = int(i_s), int(n_s)
    except ValueError:
        raise IgdError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4") from None
    if k < 1 or not 0 <= i < k:
        raise IgdError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4")
    if k > n:
        raise IgdError(f"--shard {text}: {k} shards for only {n} images")
    return i, k, i * n // k, (i + 1) * n // k


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive ranges of at most ``size`` neurons covering 0..n-1 (for job arrays)."""
    if size < 1:
        raise IgdError(f"shard size must be at least 1, got {size}")
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def shard_path(out: str | Path, a: int, b: int) -> Path:
    """The conventional file of shard A:B beside the final ``out``: ``NAME.A-B.safetensors`` (zero-padded)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.{a:05d}-{b:05d}{out.suffix or '.safetensors'}")


def identity_of(meta: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``keys`` that identities compare (a numerics record reduced to what changes a figure)."""
    return {k: comparable(meta, k) for k in keys}


def matching_artifact(path: str | Path, kind: str, meta: dict[str, Any], shape: tuple[int, ...],
                      keys: Sequence[str] = IMPORTANCE_IDENTITY, tensor: str = "importance") -> dict[str, Any] | None:
    """The metadata of ``path`` when it is a complete artifact of ``kind`` made with the same identity
    (``keys``, and ``neurons`` for a shard) and ``tensor`` has ``shape``; else None (the work must be done)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        have = read_metadata(path)
        info = tensor_info(path)
    except IgdError:
        return None  # unreadable: recompute and overwrite
    if have.get("kind") != kind or identity_of(have, keys) != identity_of(meta, keys):
        return None
    if kind.endswith("-shard") and have.get("neurons") != meta.get("neurons"):
        return None
    if tensor not in info or tuple(info[tensor]["shape"]) != tuple(shape):
        return None
    if not intact(path):
        return None  # corrupted: recompute and overwrite
    return have


# --- merge ---------------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    out: Path
    kind: str
    shape: tuple[int, ...]
    n_shards: int
    meta: dict[str, Any]


Merger = Callable[[list[Artifact], Path], MergeResult]
#: shard kind -> function merging loaded shards into ``out``
MERGERS: dict[str, Merger] = {}


def register_merger(kind: str, fn: Merger) -> None:
    MERGERS[kind] = fn


def merge(paths: Sequence[str | Path], out: str | Path) -> MergeResult:
    """Merge shard files into ``out``; dispatches on their kind. Any inconsistency raises one-line IgdError."""
    if not paths:
        raise IgdError("igd merge: give at least one shard")
    out = Path(out)
    kinds = {}
    for p in paths:
        kind = read_metadata(p).get("kind")
        kinds.setdefault(kind, []).append(Path(p))
    if len(kinds) > 1:
        listed = "; ".join(f"{k}: {', '.join(x.name for x in v)}" for k, v in kinds.items())
        raise IgdError(f"igd merge: the files are of different kinds ({listed})")
    kind = next(iter(kinds))
    if kind not in MERGERS:
        known = ", ".join(MERGERS) or "none"
        raise IgdError(f"{paths[0]}: igd merge takes shards ({known}), not {kind or 'a non-igd file'}")
    if out.resolve() in {Path(p).resolve() for p in paths}:
        raise IgdError(f"--out {out}: is one of the shards; choose another file")
    shards = [load_artifact(p, kind=kind) for p in paths]
    return MERGERS[kind](shards, out)


def check_together(shards: list[Artifact], keys: Sequence[str]) -> None:
    """All shards must agree on ``keys``; names the first key and files that differ (igd's code and the numerics
    first, with both values)."""
    ref = shards[0]
    for s in shards[1:]:
        made = difference(s.meta, ref.meta) if {"igd_code", "numerics"} & set(keys) else None
        if made is not None:
            raise IgdError(f"{s.path.name} does not belong with {ref.path.name}: different {made[0]} "
                           f"({made[1]} vs {made[2]})")
        for k in keys:
            if comparable(s.meta, k) != comparable(ref.meta, k):
                raise IgdError(f"{s.path.name} does not belong with {ref.path.name}: different {k} "
                               f"({_short(s.meta.get(k))} vs {_short(ref.meta.get(k))})")


def check_cover(shards: list[Artifact], n: int) -> list[Artifact]:
    """Shards sorted by their first neuron; they must cover 0..n-1 exactly once (no gap, no overlap)."""
    spans = []
    for s in shards:
        nb = s.meta.get("neurons")
        if not (isinstance(nb, list) and len(nb) == 2 and all(isinstance(v, int) for v in nb) and 0 <= nb[0] < nb[1] <= n):
            raise IgdError(f"{s.path}: bad or missing neurons range {nb!r} for N = {n}")
        spans.append((nb[0], nb[1], s))
    spans.sort(key=lambda t: (t[0], t[1]))
    pos, prev = 0, None
    for a, b, s in spans:
        if a < pos:
            raise IgdError(f"shards {prev.path.name} [{prev.meta['neurons'][0]}:{pos}] and {s.path.name} [{a}:{b}] "
                           f"overlap")
        if a > pos:
            raise IgdError(f"neurons {pos}:{a} are missing: no shard covers them")
        pos, prev = b, s
    if pos != n:
        raise IgdError(f"neurons {pos}:{n} are missing: no shard covers them")
    return [s for _, _, s in spans]


def _merge_importance(shards: list[Artifact], out: Path) -> MergeResult:
    check_together(shards, IMPORTANCE_IDENTITY)
    ref = shards[0].meta
    n, c = int(ref["n_neurons"]), int(ref["num_classes"])
    ordered = check_cover(shards, n)
    for s in ordered:
        a, b = s.meta["neurons"]
        if tuple(s["importance"].shape) != (b - a, c):
            raise IgdError(f"{s.path}: importance has shape {list(s['importance'].shape)}, expected [{b - a}, {c}]")
    imp = torch.cat([s["importance"].to(torch.float32) for s in ordered]).contiguous()
    meta = {k: v for k, v in ref.items() if k not in ("kind", "format_version", "igd_version", "created", "neurons",
                                                      "details", "seconds")}
    meta["seconds"] = round(sum(float(s.meta.get("seconds", 0.0)) for s in ordered), 3)
    meta["merged_from"] = [{"file": s.path.name, "neurons": s.meta["neurons"], "sha256": file_sha256(s.path),
                            "path": (s.meta.get("details") or {}).get("path")} for s in ordered]
    save_artifact(out, "importance", {"importance": imp}, meta)
    return MergeResult(out, "importance", tuple(imp.shape), len(ordered), meta)


register_merger("importance-shard", _merge_importance)


def _short(v: Any) -> str:
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."
