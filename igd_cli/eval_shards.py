"""Evaluation shards: ``igd merge`` of adversarial sets (``igd attack --shard I/N``) and of evaluation reports
(``igd defend-eval --shard I/N --report R``) into the artifact an unsharded run would have written.

A shard holds the examples at some absolute positions of the split (tensor ``index``). Merging checks that the
shards are the same computation (model, defence, data, attack, budgets, ε, seed, columns), that together they
hold every position 0..n-1 exactly once, and recomputes every summary (robust accuracy, per-column accuracies,
worst case, per-class accuracies) from the per-example tensors, so the merged numbers are those of a whole run.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch

from .artifacts import Artifact, file_sha256, save_artifact
from .errors import IgdError
from .provenance import difference
from .scoring import Score
from .shards import MergeResult, check_together, register_merger

#: metadata an adversarial set's shards must share (``defense`` is compared without the mask's path)
ADV_IDENTITY = ("model_fingerprint", "num_classes", "attack", "target", "eps", "norm", "budget", "seed", "data_id",
                "mask_sha256", "revision", "pyautoattack", "igd_code", "numerics")
#: per-shard bookkeeping dropped from the merged metadata
_SHARD_ONLY = ("kind", "format_version", "igd_version", "created", "shard", "positions", "seconds", "n_attacked",
               "robust_accuracy", "clean_accuracy", "robust_accuracy_std", "clean_accuracy_std", "score",
               "clean_score", "merged_from")


# --- positions ----------------------------------------------------------------------------------------

def check_positions(shards: Sequence[Artifact], n: int) -> list[Artifact]:
    """Shards ordered by their first position; their ``index`` tensors must hold 0..n-1 exactly once."""
    counts = torch.zeros(n, dtype=torch.int64)
    for s in shards:
        idx = s["index"].long().flatten()
        if len(idx) == 0:
            raise IgdError(f"{s.path}: holds no example")
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise IgdError(f"{s.path}: positions {int(idx.min())}..{int(idx.max())} fall outside the {n} examples")
        if len(torch.unique(idx)) != len(idx):
            raise IgdError(f"{s.path}: holds some position twice")
        counts[idx] += 1
    twice = torch.nonzero(counts > 1).flatten()
    if len(twice):
        p = int(twice[0])
        owners = [s for s in shards if bool((s["index"] == p).any())]
        raise IgdError(f"shards {_label(owners[0])} and {_label(owners[1])} overlap: {len(twice)} examples "
                       f"(from position {p}) are in both")
    missing = torch.nonzero(counts == 0).flatten()
    if len(missing):
        a = int(missing[0])
        b = a
        while b + 1 < n and counts[b + 1] == 0:
            b += 1
        raise IgdError(f"examples {a}..{b} are missing ({len(missing)} in all): no shard covers them")
    return sorted(shards, key=lambda s: int(s["index"].min()))


def _label(s: Artifact) -> str:
    sh = s.meta.get("shard")
    return f"{s.path.name} (shard {sh[0]}/{sh[1]})" if isinstance(sh, list) and len(sh) == 2 else s.path.name


def _whole_n(shards: Sequence[Artifact]) -> int:
    n = (shards[0].meta.get("data") or {}).get("n")
    if not isinstance(n, int) or n < 1:
        raise IgdError(f"{shards[0].path}: no data.n in its metadata; cannot tell how many examples the whole has")
    return n


def _merged_from(ordered: Sequence[Artifact]) -> list[dict[str, Any]]:
    return [{"file": s.path.name, "shard": s.meta.get("shard"), "n": len(s["index"]),
             "positions": [int(s["index"].min()), int(s["index"].max()) + 1], "sha256": file_sha256(s.path)}
            for s in ordered]


def _order(ordered: Sequence[Artifact]) -> torch.Tensor:
    """Permutation putting the concatenated shards' examples in position order."""
    return torch.argsort(torch.cat([s["index"].long() for s in ordered]))


def _fraction(count: int, n: int) -> float:
    """``count / n`` exactly as the unsharded run computes it (double precision), so merged figures equal
    those of an unsharded run bit for bit."""
    return count / n


# --- adversarial sets ---------------------------------------------------------------------------------

def _defense_key(meta: dict[str, Any]) -> Any:
    d = meta.get("defense")  # without the mask's or the --defense file's path
    return {k: v for k, v in d.items() if k not in ("mask", "defense")} if isinstance(d, dict) else d


def merge_adversarial(shards: list[Artifact], out) -> MergeResult:
    """Join adversarial sets of one attack (``igd attack --shard I/N``) into the whole set."""
    check_together(shards, ADV_IDENTITY)
    ref = shards[0]
    for s in shards[1:]:
        if _defense_key(s.meta) != _defense_key(ref.meta):
            raise IgdError(f"{s.path.name} does not belong with {ref.path.name}: different defence settings "
                           f"({_defense_key(s.meta)} vs {_defense_key(ref.meta)})")
    n = _whole_n(shards)
    ordered = check_positions(shards, n)
    perm = _order(ordered)
    x_adv = torch.cat([s["x_adv"].float() for s in ordered])[perm].contiguous()
    y = torch.cat([s["y"].long() for s in ordered])[perm].contiguous()
    index = torch.cat([s["index"].long() for s in ordered])[perm].contiguous()
    meta = {k: v for k, v in ref.meta.items() if k not in _SHARD_ONLY}
    if any(s.meta.get("set_key") != ref.meta.get("set_key") for s in ordered):
        meta.pop("set_key", None)
    for key, score_key in (("robust_accuracy", "score"), ("clean_accuracy", "clean_score")):
        if all(isinstance(s.meta.get(score_key), dict) for s in ordered):  # per-draw counts: exact mean and std
            merged = Score.merged([Score.from_json(s.meta[score_key]) for s in ordered])
            meta.update({key: merged.mean, f"{key}_std": merged.std, score_key: merged.to_json()})
        elif all(isinstance(s.meta.get(key), (int, float)) for s in ordered):  # sets scored by a single draw
            count = sum(round(float(s.meta[key]) * len(s["index"])) for s in ordered)
            meta[key] = _fraction(count, n)  # count-weighted mean of the shards' figures
    meta["seconds"] = round(sum(float(s.meta.get("seconds", 0.0)) for s in ordered), 3)
    meta["n_attacked"] = sum(int(s.meta.get("n_attacked", len(s["index"]))) for s in ordered)
    meta["merged_from"] = _merged_from(ordered)
    save_artifact(out, "adversarial", {"x_adv": x_adv, "y": y, "index": index}, meta)
    return MergeResult(out, "adversarial", tuple(x_adv.shape), len(ordered), meta)


# --- evaluation reports -------------------------------------------------------------------------------

def _check_identity(shards: Sequence[Artifact]) -> None:
    """Reports belong together when their ``eval_identity`` (model, defence, data, attack, budgets, ε, seed,
    protocol, skipping, given sets, igd's code, numerics) and candidates agree; names the first item that differs
    (igd's code and the numerics first, with both values)."""
    ref = shards[0]
    for s in shards:
        if not isinstance(s.meta.get("eval_identity"), dict):
            raise IgdError(f"{s.path}: an eval-report without eval_identity (written by an older igd?); rerun "
                           f"igd defend-eval --shard I/N --report to merge it")
    for s in shards[1:]:
        a, b = s.meta["eval_identity"], ref.meta["eval_identity"]
        made = difference(a, b)
        if made is not None:
            raise IgdError(f"{s.path.name} does not belong with {ref.path.name}: different {made[0]} "
                           f"({made[1]} vs {made[2]})")
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                raise IgdError(f"{s.path.name} does not belong with {ref.path.name}: different {k} "
                               f"({_short(a.get(k))} vs {_short(b.get(k))})")
    check_together(list(shards), ("columns", "candidates", "protocol", "draws", "clean_final_only"))


def merge_reports(shards: list[Artifact], out) -> MergeResult:
    """Join evaluation reports of shards into the report of the whole: the per-draw bits of every candidate are
    put in position order and every figure (selection, mean ± std, majority, all draws, per class) recomputed."""
    from .evaluate import EvalResult

    _check_identity(shards)
    ref = shards[0].meta
    n = _whole_n(shards)
    ordered = check_positions(shards, n)
    perm = _order(ordered)
    tensors: dict[str, torch.Tensor] = {}
    for name in ("base_draws", "defended_draws", "base_margins", "defended_margins", "y", "index"):
        have = [name in s.tensors for s in ordered]
        if not any(have):
            continue
        if not all(have):
            raise IgdError(f"{ordered[have.index(False)].path}: lacks tensor {name} that the other shards hold")
        tensors[name] = torch.cat([s[name] for s in ordered], dim=-1).index_select(-1, perm).contiguous()
    parts = [EvalResult.from_tensors(s.meta, s.tensors) for s in ordered]  # checks each shard's tensors
    res = EvalResult.from_tensors(ref, tensors)
    res.survivors_only = _survivors([p.survivors_only for p in parts], [p.n for p in parts], list(res.defended), n)
    res.sets, res.seconds = {}, {}
    res.no_gradient = {k: "" for p in parts for k in p.no_gradient}
    for p in parts:
        for k, v in p.sets.items():
            res.sets[k] = v if k not in res.sets or v in res.sets[k].split(", ") else f"{res.sets[k]}, {v}"
        for k, v in p.seconds.items():
            res.seconds[k] = res.seconds.get(k, 0.0) + float(v)
    meta = {k: v for k, v in ref.items() if k not in _SHARD_ONLY and k != "result"}
    meta.update({"positions": [0, n], "merged_from": _merged_from(ordered), "n_examples": n})
    res.save(out, meta)
    from .artifacts import read_metadata

    return MergeResult(out, "eval-report", (len(res.correct_matrix()[0]), n), len(ordered), read_metadata(out))


def _survivors(parts: Sequence[dict[str, int]], sizes: Sequence[int], columns: Sequence[str], n: int) -> dict[str, int]:
    """Images attacked per survivor-only column over all shards (a shard that attacked all of its images counts
    them all); a column attacked on every image of the whole is not survivor-only."""
    out: dict[str, int] = {}
    for col in columns:
        if any(col in p for p in parts):
            total = sum(int(p.get(col, size)) for p, size in zip(parts, sizes))
            if total < n:
                out[col] = total
    return out


def summary(res: MergeResult) -> dict[str, Any]:
    """Keys ``igd merge --json`` adds for merged sets and reports."""
    m = res.meta
    if res.kind == "adversarial":
        return {"attack": m.get("attack"), "target": m.get("target"), "n_examples": res.shape[0],
                "robust_accuracy": m.get("robust_accuracy"), "robust_accuracy_std": m.get("robust_accuracy_std"),
                "eps": m.get("eps"), "budget": m.get("budget")}
    if res.kind == "eval-report":
        r = m.get("result") or {}
        keys = ("n_examples", "clean_accuracy", "clean_accuracy_std", "base_clean_accuracy", "robust_accuracy",
                "robust_accuracy_std",
                "base_robust_accuracy", "worst_case", "worst_case_std", "worst_case_majority",
                "worst_case_all_draws", "base_worst_case", "draws", "protocol", "randomized", "defended",
                "measured_on_survivors", "mode", "eps", "no_gradient", "defense_label")
        return {"attack": m.get("attack"), **{k: r.get(k) for k in keys}}
    return {}


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


register_merger("adversarial", merge_adversarial)
register_merger("eval-report", merge_reports)
