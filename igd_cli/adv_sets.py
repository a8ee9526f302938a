"""Adversarial-set artifacts (tensors ``x_adv``, ``y``, ``index``): their metadata, writing, loading with the checks a
set must pass against the images it claims (content, labels, [0, 1], the ε-ball), joining shards and picking rows."""

from __future__ import annotations

import math
from importlib.metadata import version as _version
from pathlib import Path
from typing import Any, Sequence

import torch

from .artifacts import load_artifact, save_artifact
from .attacks.base import AttackResult, gather
from .data import ImageSet
from .errors import IgdError

#: tolerance when checking that a loaded set lies in the ε-ball (float32 rounding of x ± ε)
BALL_TOL = 1e-5
#: the installed pyautoattack, whose attacks igd composes: a new release may change their points
PYAUTOATTACK_VERSION = _version("pyautoattack")


def set_meta(model_meta: dict[str, Any], attack_info: dict[str, Any], target_kind: str, data: ImageSet,
             robust_accuracy: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of an adversarial set (the artifact contract): provenance of the attacked model + attack."""
    meta = dict(model_meta)
    meta.update({"attack": attack_info["attack"], "target": target_kind, "eps": attack_info["eps"],
                 "norm": attack_info.get("norm", "Linf"), "budget": attack_info.get("budget", {}),
                 "seed": attack_info.get("seed", 0), "revision": attack_info.get("revision"),
                 "pyautoattack": PYAUTOATTACK_VERSION,
                 "data": {"dataset": data.name, "split": data.split, "n": len(data)}, "data_id": data.identity(),
                 "robust_accuracy": robust_accuracy})
    meta.update(extra or {})
    return meta


def save_adversarial(path: str | Path, result: AttackResult, meta: dict[str, Any]) -> Path:
    """Write an adversarial set atomically (tensors ``x_adv``, ``y``, ``index``)."""
    return save_artifact(path, "adversarial", {"x_adv": result.x_adv.float().contiguous(), "y": result.y.long(),
                                               "index": result.index.long()}, meta)


def load_set(path: str | Path, data: ImageSet, *, eps: float | None = None) -> AttackResult:
    """Load an adversarial set and check it against ``data``: labels, positions, [0, 1] and the ε-ball."""
    art = load_artifact(path, kind="adversarial")
    x_adv, y, index = art["x_adv"].float(), art["y"].long(), art["index"].long()
    n = len(index)
    if x_adv.shape[0] != n or y.shape[0] != n or y.ndim != 1:
        raise IgdError(f"{path}: x_adv, y and index disagree in length")
    d = art.meta.get("data") or {}
    made_on = (art.meta.get("data_id") or {}).get("images")
    if made_on is not None and made_on != data.source_digest():  # by content: a file rewritten in place differs
        raise IgdError(f"{path}: made on other images ({d.get('dataset')}, {d.get('split')}) than those of "
                       f"{data.name} ({data.split}) now")
    if made_on is None and (d.get("dataset") not in (None, data.name) or d.get("split") not in (None, data.split)):
        raise IgdError(f"{path}: made on {d.get('dataset')} ({d.get('split')}), not on {data.name} ({data.split})")
    keep = index < len(data)
    x_adv, y, index = x_adv[keep], y[keep], index[keep]
    if len(index) == 0:
        raise IgdError(f"{path}: holds no image among the first {len(data)}")
    x, y_true = gather(data, index)
    if x.shape[1:] != x_adv.shape[1:]:
        raise IgdError(f"{path}: images of shape {list(x_adv.shape[1:])}, the data has {list(x.shape[1:])}")
    if not torch.equal(y, y_true):
        raise IgdError(f"{path}: labels differ from {data.name} at the stored positions")
    set_eps = float(art.meta.get("eps", eps if eps is not None else math.inf))
    if eps is not None and not math.isclose(set_eps, eps, rel_tol=1e-6, abs_tol=1e-9):
        raise IgdError(f"{path}: made at ε={set_eps:.6g}, not ε={eps:.6g}")
    if x_adv.min() < 0 or x_adv.max() > 1:
        raise IgdError(f"{path}: x_adv leaves [0, 1]")
    if art.meta.get("norm", "Linf") == "Linf" and (x_adv - x).abs().amax() > set_eps + BALL_TOL:
        raise IgdError(f"{path}: x_adv leaves the ε-ball (ε={set_eps:.6g})")
    return AttackResult(x_adv, y, index, float(art.meta.get("seconds", 0.0)), dict(art.meta))


def merge_sets(parts: Sequence[AttackResult]) -> AttackResult:
    """Join sets of the same attack (shards) by position; a position in two parts keeps the first."""
    seen: dict[int, tuple[int, int]] = {}
    for p_i, part in enumerate(parts):
        for r, i in enumerate(part.index.tolist()):
            seen.setdefault(i, (p_i, r))
    order = sorted(seen)
    x = torch.stack([parts[seen[i][0]].x_adv[seen[i][1]] for i in order])
    y = torch.stack([parts[seen[i][0]].y[seen[i][1]] for i in order])
    return AttackResult(x, y, torch.tensor(order, dtype=torch.int64), sum(p.seconds for p in parts),
                        dict(parts[0].info))


def restrict(res: AttackResult, positions: torch.Tensor) -> AttackResult | None:
    """The rows of ``res`` at ``positions`` (in that order), or None if some position is missing."""
    where = {int(i): r for r, i in enumerate(res.index.tolist())}
    rows = [where.get(int(p)) for p in positions.tolist()]
    if any(r is None for r in rows):
        return None
    rows_t = torch.tensor(rows, dtype=torch.int64)
    return AttackResult(res.x_adv[rows_t], res.y[rows_t], positions.clone(), res.seconds, res.info)
