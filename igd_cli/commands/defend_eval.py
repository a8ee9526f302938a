"""``igd defend-eval``: clean (and, through ``igd_cli.evaluate``, robust) accuracy of the base and defended model.

The clean part lives here (:func:`igd_cli.defense.clean_eval`): it reseeds the defence and walks the data in
``--batch-size`` batches exactly like ``calibrate-k``, so both report the same accuracy for the same images,
settings, seed and batch size. Attack evaluation (``--attack NAME|iw-wc`` or ``--adv``) is delegated to
``igd_cli.evaluate.evaluate_defense`` (written with the attacks), whose result provides ``to_json()`` with the
CLI keys and ``save(path, meta)`` for the eval-report artifact.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from ..artifacts import save_artifact
from ..cli import app, emit
from ..common import open_target, parse_eps
from ..console import out_console
from ..defense import CleanEval, check_settings, clean_eval, load_defense
from ..errors import IgdError
from ..options import Arch, BatchSize, DataDir, Dataset, Device, Eps, Json, Model, Seed, ThreatModel
from ..report import accuracy_table, per_class_accuracy, per_class_table, summary_table


@app.command("defend-eval")
def defend_eval_cmd(
    mask: Annotated[Path, typer.Option("--mask", help="mask artifact from igd calibrate-k")],
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf",
    attack: Annotated[str, typer.Option("--attack", help="none (clean accuracy only), an attack NAME, or iw-wc")] = "none",
    adv: Annotated[Optional[list[Path]], typer.Option("--adv", help="ready-made adversarial set(s) to evaluate")] = None,
    split: Annotated[str, typer.Option("--split", help="data split to evaluate on")] = "test",
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", help="the first N images of the split (default: all)")] = None,
    eps: Eps = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", help="smoothing noise std (default: the mask's)")] = None,
    n_smooth: Annotated[Optional[int], typer.Option("--n-smooth", help="noise samples (default: the mask's)")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", help="soft pseudo-label temperature (default: the mask's)")] = None,
    rs: Annotated[Optional[bool], typer.Option("--rs/--no-rs", help="randomized smoothing on/off (default: the mask's)")] = None,
    batch_size: BatchSize = 256, seed: Seed = 0, device: Device = "auto",
    report: Annotated[Optional[Path], typer.Option("--report", help="write an eval-report artifact: per-example "
                                                   "correctness and per-class accuracy")] = None,
    as_json: Json = False,
) -> None:
    """Clean accuracy of the base and the defended model (--attack none), or robust accuracy under attacks."""
    attack = attack.strip().lower()
    if n_smooth is not None or tau is not None or sigma is not None:
        check_settings(tau=1.0 if tau is None else tau, sigma=sigma, n_smooth=1 if n_smooth is None else n_smooth,
                       rs=False)
    t0 = time.perf_counter()
    target = open_target(model, arch, dataset, threat_model, device)
    eps_value = parse_eps(eps)
    defense = load_defense(target, mask, sigma=sigma, n_smooth=n_smooth, tau=tau, rs=rs, seed=seed)
    data = target.data(split, n_examples, data_dir)
    if target.loaded.num_classes != data.num_classes:
        raise IgdError(f"--dataset {data.name} has {data.num_classes} classes but the model predicts "
                       f"{target.loaded.num_classes}")
    if attack != "none" or adv:
        _robust(target, defense, data, mask=mask, attack=attack, adv=list(adv or []), eps=eps_value, seed=seed,
                batch_size=batch_size, report=report, as_json=as_json, t0=t0)
        return
    clean = clean_eval(defense, data, batch_size)
    result: dict[str, Any] = {
        "n_examples": len(data), "clean_accuracy": clean.accuracy, "base_clean_accuracy": clean.base_accuracy,
        "robust_accuracy": {}, "base_robust_accuracy": {}, "worst_case": None,
    }
    columns: dict[str, torch.Tensor] = {"base clean": clean.base_correct, "defended clean": clean.defended_correct}
    result.update({"mask": str(mask), "layer": defense.layer, "k": _mask_k(defense), "defense": defense.settings(),
                   "seed": seed, "batch_size": batch_size, "attack": attack,
                   "data": {"dataset": data.name, "split": split, "n": len(data)}})
    result["per_class"] = {name: per_class_accuracy(c, clean.y, data.num_classes) for name, c in columns.items()}
    result["classes"] = list(data.classes)
    result["seconds"] = time.perf_counter() - t0
    if report is not None:
        _write_report(report, target, clean, columns, result)
        result["report"] = str(report)
    emit(result, as_json, _render)


def _robust(target, defense, data, *, mask: Path, attack: str, adv: list[Path], eps: float | None, seed: int,
            batch_size: int, report: Path | None, as_json: bool, t0: float) -> None:
    """Attacks: delegated to ``igd_cli.evaluate`` (the attacks engineer's module), or a one-line error."""
    try:
        ev = importlib.import_module("igd_cli.evaluate")
    except ModuleNotFoundError as exc:
        if exc.name != "igd_cli.evaluate":
            raise
        raise IgdError(f"--attack {attack}: attack evaluation is not available in this igd yet "
                       f"(igd_cli.evaluate is missing); use --attack none") from exc
    fn = getattr(ev, "evaluate_defense", None)
    if fn is None:
        raise IgdError(f"--attack {attack}: igd_cli.evaluate has no evaluate_defense(); use --attack none")
    ident = ev.defense_identity(mask, defense) if hasattr(ev, "defense_identity") else {"mask": str(mask)}
    res = fn(target, defense, data, attack=attack, adv_files=adv, eps=eps, seed=seed, batch_size=batch_size,
             defense_meta=ident)
    result = res.to_json()
    result.update({"mask": str(mask), "layer": defense.layer, "k": _mask_k(defense), "defense": defense.settings(),
                   "attack": attack, "batch_size": batch_size, "seconds_total": time.perf_counter() - t0})
    if report is not None:
        res.save(report, {**target.provenance(), **ident})
        result["report"] = str(report)

    def render(r: dict) -> None:
        rows = [("clean", r["base_clean_accuracy"], r["clean_accuracy"])]
        rows += [(n, r["base_robust_accuracy"].get(n), a) for n, a in r["robust_accuracy"].items()]
        if r["worst_case"] is not None:
            rows.append(("worst case (IW-WC)", r.get("base_worst_case"), r["worst_case"]))
        out_console.print(accuracy_table(f"defend-eval --attack {attack}: {r['n_examples']} images", rows))

    emit(result, as_json, getattr(ev, "render_table", None) or render)


def _mask_k(defense) -> int | None:
    col = defense.mask.sum(dim=0)
    return int(col[0]) if bool((col == col[0]).all()) else None


def _robust_eval_fn(attack: str):
    """The attack evaluator from ``igd_cli.evaluate`` (written with the attacks), or a one-line error."""
    try:
        mod = importlib.import_module("igd_cli.evaluate")
    except ModuleNotFoundError as exc:
        if exc.name != "igd_cli.evaluate":
            raise
        raise IgdError(f"--attack {attack}: attack evaluation is not available in this igd yet "
                       f"(igd_cli.evaluate is missing); use --attack none") from exc
    fn = getattr(mod, "robust_eval", None)
    if fn is None:
        raise IgdError(f"--attack {attack}: igd_cli.evaluate has no robust_eval(); use --attack none")
    return fn


def _write_report(path: Path, target, clean: CleanEval, columns: dict[str, torch.Tensor], result: dict) -> None:
    """eval-report artifact: ``correct`` uint8 (n, columns), ``y``, ``index``; accuracies in the metadata."""
    names = list(columns)
    correct = torch.stack([columns[n].to(torch.uint8).cpu() for n in names], dim=1)
    counts = torch.bincount(clean.y, minlength=len(result["classes"])).tolist()
    meta = {**target.provenance(), "columns": names, "classes": result["classes"], "class_counts": counts,
            "accuracy": {n: float(columns[n].float().mean()) for n in names},
            "per_class": result["per_class"],
            **{k: result[k] for k in ("n_examples", "clean_accuracy", "base_clean_accuracy", "robust_accuracy",
                                      "base_robust_accuracy", "worst_case", "mask", "layer", "k", "defense",
                                      "seed", "batch_size", "attack", "data")}}
    save_artifact(path, "eval-report", {"correct": correct, "y": clean.y, "index": clean.index}, meta)


def _render(r: dict) -> None:
    rows = [("clean", r["base_clean_accuracy"], r["clean_accuracy"])]
    for name, acc in r["robust_accuracy"].items():
        rows.append((name, r["base_robust_accuracy"].get(name), acc))
    if r["worst_case"] is not None:
        rows.append(("worst case (IW-WC)", None, r["worst_case"]))
    out_console.print(accuracy_table(f"defend-eval: {r['n_examples']} images of {r['data']['dataset']} "
                                     f"({r['data']['split']})", rows))
    d = r["defense"]
    out_console.print(summary_table("defence", [
        ("mask", f"{r['mask']} (layer {r['layer']}, k = {r['k']})"),
        ("smoothing", f"σ = {d['sigma']}, n_s = {d['n_smooth']}" if d["rs"] else "off"),
        ("τ", str(d["tau"])), ("seed", str(r["seed"])), ("seconds", f"{r['seconds']:.1f}")]))
    if "report" in r:
        out_console.print(per_class_table(r["classes"], r["per_class"]))
        out_console.print(f"report -> {r['report']}")
