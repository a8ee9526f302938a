"""RobustBench-style results of an evaluation (``igd report --model-info FILE.json``): one JSON file with the fields
of RobustBench's ``model_info/<dataset>/<threat model>/<name>.json`` (the leaderboard's entries) filled from an
eval report, and what igd evaluated and how under ``igd``.

RobustBench's fields, as its files spell them: accuracies in percent as strings with two decimals; ``eps`` as
``"8/255"`` or ``"0.5"``; ``autoattack_acc`` is AutoAttack's robust accuracy and ``external`` the robust accuracy
of a stronger evaluation (its leaderboard ranks by ``external`` when present). Here ``autoattack_acc`` is filled
only when AutoAttack ran on the defended model over every evaluated image with its full budget, and
``external`` holds IW-WC's image-wise worst case; what igd cannot know (``link``, ``name``, ``authors``,
``venue``, ``additional_data``, ``architecture``, ``reported``, ``unreliable``) is null, for the submitter
(or RobustBench's maintainers) to fill.

Example::

    info = model_info("runs/demo")              # a run folder (its IW-WC eval report) or an eval report file
    info["clean_acc"], info["external"], info["igd"]["robust_accuracy"]["std"]
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

from . import __version__
from .artifacts import atomic_write_bytes, load_artifact, read_metadata
from .errors import IgdError
from .attacks.base import BUDGET_KEYS
from .eval_result import column_label

#: RobustBench's own fields igd leaves for the submitter (null in the file)
SUBMITTER_FIELDS = ("link", "name", "authors", "venue", "additional_data", "architecture", "reported", "unreliable")


def eval_report_path(source: str | Path) -> Path:
    """The eval report ``source`` names: the file itself, or in a run folder its one eval report (of several, the
    one IW-WC wrote); a one-line error otherwise."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise IgdError(f"{source}: no such run folder or eval report")
    found = []
    for p in sorted(source.glob("*.safetensors")):
        try:
            meta = read_metadata(p)
        except IgdError:
            continue
        if meta.get("kind") == "eval-report":
            found.append((p, (meta.get("result") or {}).get("mode")))
    if not found:
        raise IgdError(f"{source}: no eval report in this folder (igd pipeline or igd defend-eval --report writes "
                       "one)")
    iwwc = [p for p, mode in found if mode == "iw-wc"]
    if len(found) == 1 or len(iwwc) == 1:
        return found[0][0] if len(found) == 1 else iwwc[0]
    raise IgdError(f"{source}: several eval reports ({', '.join(p.name for p, _ in found)}): give the one to "
                   "describe")


def eps_text(eps: float, norm: str) -> str:
    """ε as RobustBench writes it: ``8/255`` for an l-inf budget of whole 255ths that no short decimal states,
    else the decimal (``0.5``, ``0.3``)."""
    short = float(format(eps, ".4g"))
    whole = Fraction(eps).limit_denominator(255)
    if short != eps and norm == "Linf" and whole.denominator == 255 and float(whole) == eps:
        return f"{whole.numerator}/255"
    return format(eps, ".4g") if short == eps else repr(eps)


def _label(column: str) -> str:
    """A column's table label, without the table's footnote mark."""
    return column_label(column).rstrip("‡")


def _num(v: Any) -> str:
    """A setting in a sentence: four significant digits."""
    return format(v, ".4g") if isinstance(v, float) else str(v)


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.2f}"


def _score(result: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """mean, std, majority and all-draws figures of ``worst_case`` or ``iw_wc_paper`` (None when absent)."""
    if result.get(prefix) is None:
        return None
    return {"mean": result[prefix], "std": result.get(f"{prefix}_std"),
            "majority": result.get(f"{prefix}_majority"), "all_draws": result.get(f"{prefix}_all_draws")}


def forward_passes(meta: dict[str, Any]) -> int | None:
    """Forward passes of the base model per prediction: IG-Defense with smoothing ``n_s + 1`` (the n_s noisy
    copies, then the masked pass of the image), without ``2`` (the second re-runs the layers after the masked
    one); None for a defence igd does not know."""
    settings = meta.get("settings")
    if meta.get("mask_sha256") is None or not isinstance(settings, dict):
        return None
    return int(settings.get("n_smooth", 1)) + 1 if settings.get("rs", True) else 2


def model_info(source: str | Path) -> dict[str, Any]:
    """RobustBench's model-info fields and igd's record of the evaluation, from an eval report or a run folder
    (:func:`eval_report_path`); the report is read whole and its tensor digest checked.

    Example::

        info = model_info("eval.safetensors")               # igd defend-eval --report eval.safetensors
        info["clean_acc"], info["external"], info["eps"], info["igd"]["robust_accuracy"]
    """
    path = eval_report_path(source)
    art = load_artifact(path, kind="eval-report")
    meta, r = art.meta, art.meta.get("result") or {}
    ident = meta.get("eval_identity") or meta.get("pipeline_identity") or {}
    norm = meta.get("norm") or ident.get("norm") or "Linf"
    eps = r.get("eps")
    mode = str(r.get("mode", "none"))
    data = meta.get("data") or {}
    n = int(r.get("n_examples", 0))
    budget = meta.get("budget") or ident.get("budget") or ident.get("budgets") or {}
    # the columns in scoring order (the result's dictionaries read back with sorted keys)
    columns = [c for c in (meta.get("candidates") or {}).get("defended" if r.get("defended", True) else "base", [])
               if c != "clean"] or sorted(r.get("robust_accuracy") or {})
    reduced = {k: budget[k] for k in BUDGET_KEYS if budget.get(k) is not None}
    on_survivors = r.get("measured_on_survivors") or {}

    if mode == "none" or not columns:
        robust, what = None, None
    elif mode == "iw-wc":
        robust = _score(r, "worst_case")
        what = (f"image-wise worst case over clean and {len(columns)} attacks: "
                + ", ".join(_label(c) for c in columns))
    else:
        robust = _score(r, "worst_case")
        what = f"per image the worse of clean and {_label(mode)}"
    aa = None
    aa_note = "AutoAttack was not run on the defended model"
    if "aa" in columns:
        if "aa" in on_survivors:
            aa_note = (f"AutoAttack ran on the defended model only on the {on_survivors['aa']} images earlier "
                       "attacks had not broken (a lower bound of its own robust accuracy)")
        elif reduced:
            aa_note = f"AutoAttack ran with reduced budgets ({', '.join(f'{k} {v}' for k, v in reduced.items())})"
        else:
            aa = {"mean": r["robust_accuracy"]["aa"], "std": (r.get("robust_accuracy_std") or {}).get("aa")}
            aa_note = "AutoAttack (standard version) on the defended model, every image"

    defended = bool(r.get("defended", True))
    if meta.get("mask_sha256") is not None:
        defense = {"method": "IG-Defense", "layer": meta.get("layer"), "k": meta.get("k"),
                   "mask_sha256": meta.get("mask_sha256"), "settings": meta.get("settings")}
    elif isinstance(meta.get("defense"), str):  # a user's --defense (igd_cli.contract): what identifies it
        defense = {"method": "own", "spec": meta["defense"],
                   **{k: meta.get(k) for k in ("callable", "source_sha256", "defense_fingerprint", "settings",
                                               "randomized")}}
    else:
        defense = meta.get("defense")
    draws = int(r.get("draws", 1))
    randomized = bool(r.get("randomized"))
    scoring = (f"a randomized defence: per image the point with the lowest mean correctness over {draws} noise draws "
               f"is selected and scored on {draws} independent draws, reported as the mean over draws ± std"
               if randomized and draws > 1 else "each point classified once")
    eps_s = None if eps is None else eps_text(float(eps), norm)

    what_was = "IG-Defense" if defense and defense.get("method") == "IG-Defense" else "the defence"
    if defense and defense.get("method") == "own":
        what_was = f"the defence {defense.get('callable')} (--defense, source sha256 {str(defense.get('source_sha256'))[:16]})"
    setting = ""
    if what_was == "IG-Defense":
        s = defense.get("settings") or {}
        smooth = f"σ = {_num(s.get('sigma'))}, n_s = {s.get('n_smooth')}" if s.get("rs", True) else "no smoothing"
        setting = f" (layer {defense.get('layer')}, k = {defense.get('k')}, τ = {_num(s.get('tau'))}, {smooth})"
    footnote = (f"Evaluated with igd {meta.get('igd_version', __version__)}: {what_was}{setting} on "
                f"{meta.get('model')}, {n} {data['split'] + ' ' if data.get('split') else ''}images of "
                f"{data.get('dataset', meta.get('dataset'))}"
                + (f", {norm} ε = {eps_s}" if eps_s else "") + ". "
                + (f"Robust accuracy (external): {what}; {scoring}. " if robust else "")
                + (("Attack budgets: reduced (" + ", ".join(f"{k} {v}" for k, v in reduced.items()) + "). ")
                   if reduced and robust else "Attack budgets: each attack's default. " if robust else "")
                + f"{aa_note}.")

    info: dict[str, Any] = {k: None for k in SUBMITTER_FIELDS}
    info.update({
        "number_forward_passes": forward_passes(meta) if defended else 1,
        "dataset": data.get("dataset", meta.get("dataset")),
        "threat_model": norm,
        "eps": eps_s,
        "clean_acc": _pct(r.get("clean_accuracy")),
        "autoattack_acc": _pct(aa["mean"]) if aa else None,
        "external": _pct(robust["mean"]) if robust and mode == "iw-wc" else None,
        "footnote": footnote,
        "igd": {
            "igd_version": meta.get("igd_version"),
            "eval_report": {"file": path.name, "sha256": art.sha256, "created": meta.get("created")},
            "model": {"name": meta.get("model"), "fingerprint": meta.get("model_fingerprint"),
                      "num_classes": meta.get("num_classes")},
            "defense": defense if defended else None,
            "data": {"dataset": data.get("dataset", meta.get("dataset")), "split": data.get("split"),
                     "n_examples": n, "images_sha256": (ident.get("data") or {}).get("images")},
            "threat_model": norm,
            "eps": eps,
            "evaluation": {"attack": mode, "columns": columns, "budgets": budget, "seed": r.get("seed"),
                           "measured_on_survivors": on_survivors,
                           "bpda_temperature": meta.get("bpda_temperature", ident.get("bpda_temperature"))},
            "scoring": {"protocol": r.get("protocol"), "draws": draws, "randomized": randomized,
                        "how": scoring},
            "clean_accuracy": {"mean": r.get("clean_accuracy"), "std": r.get("clean_accuracy_std")},
            "robust_accuracy": None if robust is None else {"what": what, **robust},
            "iw_wc_paper": _score(r, "iw_wc_paper"),
            "autoattack_accuracy": aa,
            "autoattack_note": aa_note,
            "base_model": {"clean_accuracy": r.get("base_clean_accuracy"),
                           "robust_accuracy": r.get("base_worst_case")},
        },
    })
    return info


def write_model_info(source: str | Path, out: str | Path) -> dict[str, Any]:
    """Write :func:`model_info` of ``source`` to ``out`` (indented JSON, atomically); returns it.

    Example::

        write_model_info("runs/demo", "runs/demo/model-info.json")      # as igd report --model-info
    """
    out = Path(out)
    if out.is_dir():
        raise IgdError(f"--model-info {out}: is a directory")
    info = model_info(source)
    atomic_write_bytes(out, (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode())
    return info
