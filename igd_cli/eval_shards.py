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
from .report import per_class_accuracy
from .shards import MergeResult, check_together, register_merger

#: metadata an adversarial set's shards must share (``defense`` is compared without the mask's path)
ADV_IDENTITY = ("model_fingerprint", "num_classes", "attack", "target", "eps", "norm", "budget", "seed", "data",
                "mask_sha256")
#: how an eval-report stores ``correct``: defend-eval --attack none writes images × columns; attack
#: evaluations (``EvalResult.save``) write columns × images
LAYOUT_KEY = "correct_layout"
IMAGES_BY_COLUMNS = "images×columns"
COLUMNS_BY_IMAGES = "columns×images"
#: per-shard bookkeeping dropped from the merged metadata
_SHARD_ONLY = ("kind", "format_version", "igd_version", "created", "shard", "positions", "seconds", "n_attacked",
               "robust_accuracy", "clean_accuracy", "merged_from")


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
    d = meta.get("defense")
    return {k: v for k, v in d.items() if k != "mask"} if isinstance(d, dict) else d


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
    for key in ("robust_accuracy", "clean_accuracy"):
        if all(isinstance(s.meta.get(key), (int, float)) for s in ordered):
            count = sum(round(float(s.meta[key]) * len(s["index"])) for s in ordered)
            meta[key] = _fraction(count, n)  # count-weighted mean of the shards' figures
    meta["seconds"] = round(sum(float(s.meta.get("seconds", 0.0)) for s in ordered), 3)
    meta["n_attacked"] = sum(int(s.meta.get("n_attacked", len(s["index"]))) for s in ordered)
    meta["merged_from"] = _merged_from(ordered)
    save_artifact(out, "adversarial", {"x_adv": x_adv, "y": y, "index": index}, meta)
    return MergeResult(out, "adversarial", tuple(x_adv.shape), len(ordered), meta)


# --- evaluation reports -------------------------------------------------------------------------------

def clean_report_stats(names: list[str], correct: torch.Tensor, y: torch.Tensor,
                       num_classes: int) -> dict[str, Any]:
    """Summary metadata of a ``defend-eval --attack none`` report (``correct`` images × columns): per-column
    accuracy, per-class accuracy, class counts and the clean accuracies; the one computation for a whole run
    and for merged shards."""
    n = correct.shape[0]
    col = {name: correct[:, i].bool() for i, name in enumerate(names)}
    out: dict[str, Any] = {
        "n_examples": n,
        "class_counts": torch.bincount(y, minlength=num_classes).tolist(),
        "accuracy": {name: int(c.sum()) / n for name, c in col.items()},
        "per_class": {name: per_class_accuracy(c, y, num_classes) for name, c in col.items()},
    }
    if "defended clean" in col:
        out["clean_accuracy"] = int(col["defended clean"].sum()) / n
    if "base clean" in col:
        out["base_clean_accuracy"] = int(col["base clean"].sum()) / n
    return out


def _check_identity(shards: Sequence[Artifact]) -> None:
    """Reports belong together when their ``eval_identity`` (model, defence, data, attack, budgets, ε, seed,
    skipping, given sets) and columns agree; names the first item that differs."""
    ref = shards[0]
    for s in shards:
        if not isinstance(s.meta.get("eval_identity"), dict):
            raise IgdError(f"{s.path}: an eval-report without eval_identity (written by an older igd?); rerun "
                           f"igd defend-eval --shard I/N --report to merge it")
    for s in shards[1:]:
        a, b = s.meta["eval_identity"], ref.meta["eval_identity"]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                raise IgdError(f"{s.path.name} does not belong with {ref.path.name}: different {k} "
                               f"({_short(a.get(k))} vs {_short(b.get(k))})")
    check_together(list(shards), ("columns", LAYOUT_KEY))


def merge_reports(shards: list[Artifact], out) -> MergeResult:
    """Join evaluation reports of shards into the report of the whole, every summary recomputed."""
    _check_identity(shards)
    ref = shards[0].meta
    n = _whole_n(shards)
    ordered = check_positions(shards, n)
    names = list(ref["columns"])
    layout = ref.get(LAYOUT_KEY)
    img_axis = 0 if layout == IMAGES_BY_COLUMNS else 1
    for s in ordered:
        shape = tuple(s["correct"].shape)
        want = (len(s["index"]), len(names)) if img_axis == 0 else (len(names), len(s["index"]))
        if shape != want:
            raise IgdError(f"{s.path}: correct has shape {list(shape)}, expected {list(want)} ({layout})")
    perm = _order(ordered)
    correct = torch.cat([s["correct"] for s in ordered], dim=img_axis).index_select(img_axis, perm).contiguous()
    y = torch.cat([s["y"].long() for s in ordered])[perm].contiguous()
    index = torch.cat([s["index"].long() for s in ordered])[perm].contiguous()
    meta = {k: v for k, v in ref.items() if k not in _SHARD_ONLY and k != "result"}
    meta["positions"] = [0, n]
    meta["merged_from"] = _merged_from(ordered)
    if layout == IMAGES_BY_COLUMNS:
        meta.update(clean_report_stats(names, correct, y, len(ref["classes"])))
        meta["seconds"] = round(sum(float(s.meta.get("seconds", 0.0)) for s in ordered), 3)
        save_artifact(out, "eval-report", {"correct": correct, "y": y, "index": index}, meta)
    else:
        res = _eval_result(ordered, names, correct, y, index)
        got, _ = res.correct_matrix()
        if got != names:
            raise IgdError(f"{ordered[0].path}: columns {names} are not those of an evaluation result ({got})")
        meta["n_examples"] = n
        res.save(out, meta)
        from .artifacts import read_metadata

        meta = read_metadata(out)
    return MergeResult(out, "eval-report", tuple(correct.shape), len(ordered), meta)


def _eval_result(ordered: Sequence[Artifact], names: list[str], correct: torch.Tensor, y: torch.Tensor,
                 index: torch.Tensor):
    """The :class:`~igd_cli.evaluate.EvalResult` of the whole, rebuilt from the merged ``correct`` rows (worst
    cases are recomputed from the columns), with survivor counts, sets and timings of the shards combined."""
    from .evaluate import EvalResult

    ref = ordered[0].meta.get("result") or {}
    rows = {name: correct[i].bool() for i, name in enumerate(names)}
    base = {k.split(":", 1)[1]: v for k, v in rows.items()
            if k.startswith("base:") and k not in ("base:clean", "base:worst_case")}
    defended = {k.split(":", 1)[1]: v for k, v in rows.items()
                if k.startswith("defended:") and k not in ("defended:clean", "defended:worst_case")}
    n = len(y)
    survivors: dict[str, int] = {}
    for col in defended:
        if any(col in (s.meta.get("result") or {}).get("measured_on_survivors", {}) for s in ordered):
            total = sum(int((s.meta.get("result") or {}).get("measured_on_survivors", {}).get(col, len(s["index"])))
                        for s in ordered)
            if total < n:
                survivors[col] = total
    sets: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for s in ordered:
        r = s.meta.get("result") or {}
        for k, v in (r.get("sets") or {}).items():
            sets[k] = v if k not in sets or v in sets[k].split(", ") else f"{sets[k]}, {v}"
        for k, v in (r.get("seconds") or {}).items():
            seconds[k] = seconds.get(k, 0.0) + float(v)
    classes = list(ordered[0].meta.get("classes") or (ref.get("per_class") or {}).get("classes") or [])
    return EvalResult(y, index, classes, rows["base:clean"], rows.get("defended:clean"), base, defended,
                      survivors, sets, seconds, eps=float(ref.get("eps", 0.0)), seed=int(ref.get("seed", 0)),
                      mode=str(ref.get("mode", "none")))


def summary(res: MergeResult) -> dict[str, Any]:
    """Keys ``igd merge --json`` adds for merged sets and reports."""
    m = res.meta
    if res.kind == "adversarial":
        return {"attack": m.get("attack"), "target": m.get("target"), "n_examples": res.shape[0],
                "robust_accuracy": m.get("robust_accuracy"), "eps": m.get("eps"), "budget": m.get("budget")}
    if res.kind == "eval-report":
        r = m.get("result")
        if isinstance(r, dict):  # attack evaluation
            keys = ("n_examples", "clean_accuracy", "base_clean_accuracy", "robust_accuracy",
                    "base_robust_accuracy", "worst_case", "base_worst_case")
            return {"attack": m.get("attack"), **{k: r.get(k) for k in keys}}
        return {"attack": m.get("attack"), "n_examples": m.get("n_examples"), "clean_accuracy": m.get("clean_accuracy"),
                "base_clean_accuracy": m.get("base_clean_accuracy"), "robust_accuracy": {},
                "base_robust_accuracy": {}, "worst_case": None}
    return {}


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else str(v)
    return text if len(text) <= 80 else text[:77] + "..."


register_merger("adversarial", merge_adversarial)
register_merger("eval-report", merge_reports)
