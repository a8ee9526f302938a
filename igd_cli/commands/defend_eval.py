"""``igd defend-eval``: clean (and, through ``igd_cli.evaluate``, robust) accuracy of the base and defended model.

The clean part lives here (:func:`igd_cli.defense.clean_eval`): it reseeds the defence and walks the data in
``--batch-size`` batches exactly like ``calibrate-k``, so both report the same accuracy for the same images,
settings, seed and batch size. Attack evaluation (``--attack NAME|iw-wc`` or ``--adv``) is delegated to
:func:`igd_cli.evaluate.evaluate_defense`, with the budgets, workdir and skipping given here.

``--shard I/N`` evaluates the I-th contiguous block of the ``--n-examples`` images; its report records the shard,
the absolute positions (``index``) and an ``eval_identity`` so ``igd merge`` can join shard reports into the
report of the whole (:mod:`igd_cli.eval_shards`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from ..artifacts import read_metadata, save_artifact
from ..cli import app, emit
from ..common import check_classes, open_target, parse_eps
from ..console import out_console
from ..defense import CleanEval, check_settings, clean_eval, load_defense
from ..errors import IgdError
from ..eval_shards import COLUMNS_BY_IMAGES, IMAGES_BY_COLUMNS, LAYOUT_KEY, clean_report_stats
from ..evaluate import Budgets, default_workdir, defense_identity, evaluate_defense, render_table
from ..options import (Arch, BatchSize, DataDir, Dataset, Device, EotIter, Eps, Json, Model, Queries, Restarts, Seed,
                       Shard, Steps, ThreatModel, ZooDataset)
from ..report import accuracy_table, per_class_accuracy, per_class_table, summary_table
from ..shards import parse_shard


@app.command("defend-eval", short_help="clean and robust accuracy, base vs defended model")
def defend_eval_cmd(
    mask: Annotated[Path, typer.Option("--mask", help="mask artifact from igd calibrate-k")],
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf",
    zoo_dataset: ZooDataset = None,
    attack: Annotated[str, typer.Option("--attack", help="none (clean accuracy only), an attack NAME, or iw-wc")] = "none",
    adv: Annotated[Optional[list[Path]], typer.Option("--adv", metavar="FILE", help="ready-made adversarial set(s) to evaluate")] = None,
    split: Annotated[str, typer.Option("--split", help="data split to evaluate on")] = "test",
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", help="the first N images of the split (default: all)")] = None,
    eps: Eps = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", help="smoothing noise std (default: the mask's)")] = None,
    n_smooth: Annotated[Optional[int], typer.Option("--n-smooth", help="noise samples (default: the mask's)")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", help="soft pseudo-label temperature (default: the mask's)")] = None,
    rs: Annotated[Optional[bool], typer.Option("--rs/--no-rs", help="randomized smoothing on/off (default: the mask's)")] = None,
    steps: Steps = None,
    restarts: Restarts = None,
    queries: Queries = None,
    eot_iter: EotIter = None,
    workdir: Annotated[Optional[Path], typer.Option("--workdir", help="where attack sets are kept and resumed "
                                                    "(default: $IGD_HOME/adv/<model fingerprint>)")] = None,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="IW-WC: attack the defended model only on images no "
                                       "earlier attack broke (same worst case, faster)")] = True,
    shard: Shard = None,
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
    budgets = Budgets(steps=steps, restarts=restarts, queries=queries, eot_iter=eot_iter)
    for name, v in budgets.kwargs().items():
        if v is not None and v < 1:
            raise IgdError(f"--{name.replace('_', '-')} {v}: must be at least 1")
    if attack == "none" and any(v is not None for v in budgets.kwargs().values()):
        raise IgdError("--steps/--restarts/--queries/--eot-iter set attack budgets: give --attack NAME or iw-wc")
    if report is not None and report.is_dir():
        raise IgdError(f"--report {report}: is a directory")
    t0 = time.perf_counter()
    target = open_target(model, arch, dataset, threat_model, device, zoo_dataset)
    eps_value = parse_eps(eps)
    defense = load_defense(target, mask, sigma=sigma, n_smooth=n_smooth, tau=tau, rs=rs, seed=seed)
    data = target.data(split, n_examples, data_dir)
    check_classes(target, data)
    sh = parse_shard(shard, len(data))
    ident = defense_identity(mask, defense)
    identity = _eval_identity(target, ident, data, attack=attack, eps=eps_value, threat_model=threat_model,
                              budgets=budgets, seed=seed, skip=skip, adv=list(adv or []))
    where: dict[str, Any] = {"data": {"dataset": data.name, "split": split, "n": len(data)},
                             "probe": read_metadata(mask).get("probe")}  # the mask's ranking images
    if sh is not None:
        where.update({"shard": [sh[0], sh[1]], "positions": [sh[2], sh[3]]})
    if attack != "none" or adv:
        _robust(target, defense, data, mask=mask, attack=attack, adv=list(adv or []), eps=eps_value,
                threat_model=threat_model, budgets=budgets, workdir=workdir, skip=skip, shard=sh, seed=seed,
                batch_size=batch_size, report=report, as_json=as_json, t0=t0, ident=ident, identity=identity,
                where=where)
        return
    view = data if sh is None else data.view(sh[2], sh[3])
    clean = clean_eval(defense, view, batch_size)
    result: dict[str, Any] = {
        "n_examples": len(view), "clean_accuracy": clean.accuracy, "base_clean_accuracy": clean.base_accuracy,
        "robust_accuracy": {}, "base_robust_accuracy": {}, "worst_case": None,
    }
    columns: dict[str, torch.Tensor] = {"base clean": clean.base_correct, "defended clean": clean.defended_correct}
    result.update({"mask": str(mask), "layer": defense.layer, "k": _mask_k(defense), "defense": defense.settings(),
                   "seed": seed, "batch_size": batch_size, "attack": attack, **where})
    result["per_class"] = {name: per_class_accuracy(c, clean.y, data.num_classes) for name, c in columns.items()}
    result["classes"] = list(data.classes)
    result["seconds"] = time.perf_counter() - t0
    if report is not None:
        _write_report(report, target, clean, columns, result, ident, identity)
        result["report"] = str(report)
    emit(result, as_json, _render)


def _eval_identity(target, ident: dict[str, Any], data, *, attack: str, eps: float | None, threat_model: str,
                   budgets: Budgets, seed: int, skip: bool, adv: list[Path]) -> dict[str, Any]:
    """What makes two reports parts of one evaluation (``igd merge`` compares it): model, defence (mask sha256
    and settings), data, attack, ε, budgets, seed, skipping and the given sets (by their attack identity, so
    shards may be given the matching shards of a set)."""
    sets = []
    for f in adv:
        m = read_metadata(f)
        sets.append({k: m.get(k) for k in ("attack", "target", "eps", "norm", "budget", "seed", "model_fingerprint",
                                           "mask_sha256")})
    sets.sort(key=lambda d: json.dumps(d, sort_keys=True, default=str))
    out = {"model_fingerprint": target.loaded.fingerprint, "num_classes": target.loaded.num_classes,
           "mask_sha256": ident["mask_sha256"], "layer": ident.get("layer"), "k": ident.get("k"),
           "defense": ident.get("settings"), "data": {"dataset": data.name, "split": data.split, "n": len(data)},
           "classes": list(data.classes), "attack": attack,
           "eps": _used_eps(target, eps, attack, adv), "norm": threat_model,
           "budget": budgets.kwargs(), "seed": int(seed), "skip": bool(skip), "adv": sets}
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # as it reads back from metadata


def _used_eps(target, eps: float | None, attack: str, adv: list[Path]) -> float | None:
    """ε as the evaluation uses it: None for clean accuracy alone (--attack none, no --adv), where it is unused."""
    if eps is not None:
        return float(eps)
    if attack == "none" and not adv:
        return None
    return float(target.default_eps(f"--attack {attack}" if attack != "none" else "checking the --adv sets"))


def _robust(target, defense, data, *, mask: Path, attack: str, adv: list[Path], eps: float | None,
            threat_model: str, budgets: Budgets, workdir: Path | None, skip: bool,
            shard: tuple[int, int, int, int] | None, seed: int, batch_size: int, report: Path | None,
            as_json: bool, t0: float, ident: dict[str, Any], identity: dict[str, Any],
            where: dict[str, Any]) -> None:
    """Attacks and given sets through :func:`igd_cli.evaluate.evaluate_defense`; a shard evaluates (and attacks)
    only its positions, which keep their absolute values (per-image attack seeds as in a whole run)."""
    wd: Path | str = workdir if workdir is not None else "auto"
    positions = None
    if shard is not None:
        # each shard keeps its sets apart, so shards sharing a workdir (a cluster's shared disk) never
        # overwrite each other's sets and each resumes its own
        wd = (workdir if workdir is not None else default_workdir(target)) / f"shard-{shard[0]}-of-{shard[1]}"
        positions = torch.arange(shard[2], shard[3], dtype=torch.int64)
    res = evaluate_defense(target, defense, data, attack=attack, adv_files=adv, workdir=wd, budgets=budgets,
                           eps=eps, norm=threat_model, seed=seed, batch_size=batch_size, skip=skip,
                           defense_meta=ident, positions=positions)
    result = res.to_json()
    result.update({"mask": str(mask), "layer": defense.layer, "k": _mask_k(defense), "defense": defense.settings(),
                   "attack": attack, "batch_size": batch_size, "budget": budgets.kwargs(), "skip": skip,
                   "workdir": str(default_workdir(target) if wd == "auto" else wd), **where,
                   "seconds_total": time.perf_counter() - t0})
    if report is not None:
        res.save(report, {**target.provenance(), **ident, "eval_identity": identity, LAYOUT_KEY: COLUMNS_BY_IMAGES,
                          "classes": list(data.classes), "attack": attack, "eps": res.eps, "norm": threat_model,
                          "budget": budgets.kwargs(), "seed": seed, "skip": skip, "batch_size": batch_size,
                          "n_examples": res.n, "seconds": round(time.perf_counter() - t0, 3), **where})
        result["report"] = str(report)

    def render(r: dict) -> None:
        what = "--adv" if attack == "none" else f"--attack {attack}"
        render_table(r, title=f"defend-eval {what}: robust accuracy (%), {r['n_examples']} images"
                              + (f" (shard {r['shard'][0]}/{r['shard'][1]})" if "shard" in r else "")
                              + f", ε={r.get('eps', 0):.4g}")
        if "report" in r:
            out_console.print(f"report -> {r['report']}")

    emit(result, as_json, render)


def _mask_k(defense) -> int | None:
    col = defense.mask.sum(dim=0)
    return int(col[0]) if bool((col == col[0]).all()) else None


def _write_report(path: Path, target, clean: CleanEval, columns: dict[str, torch.Tensor], result: dict,
                  ident: dict[str, Any], identity: dict[str, Any]) -> None:
    """eval-report artifact: ``correct`` uint8 (n, columns), ``y``, ``index`` (absolute positions); accuracies,
    the shard and the evaluation identity (for ``igd merge``) in the metadata."""
    names = list(columns)
    correct = torch.stack([columns[n].to(torch.uint8).cpu() for n in names], dim=1)
    meta = {**target.provenance(), "columns": names, "classes": result["classes"], LAYOUT_KEY: IMAGES_BY_COLUMNS,
            **clean_report_stats(names, correct, clean.y, len(result["classes"])),
            "mask_sha256": ident["mask_sha256"], "eval_identity": identity, "seconds": round(result["seconds"], 3),
            **{k: result[k] for k in ("robust_accuracy", "base_robust_accuracy", "worst_case", "mask", "layer", "k",
                                      "defense", "seed", "batch_size", "attack", "data", "probe")},
            **{k: result[k] for k in ("shard", "positions") if k in result}}
    save_artifact(path, "eval-report", {"correct": correct, "y": clean.y, "index": clean.index}, meta)


def _render(r: dict) -> None:
    rows = [("clean", r["base_clean_accuracy"], r["clean_accuracy"])]
    for name, acc in r["robust_accuracy"].items():
        rows.append((name, r["base_robust_accuracy"].get(name), acc))
    if r["worst_case"] is not None:
        rows.append(("worst case (IW-WC)", None, r["worst_case"]))
    part = f", shard {r['shard'][0]}/{r['shard'][1]}: images {r['positions'][0]}..{r['positions'][1] - 1}" \
        if "shard" in r else ""
    out_console.print(accuracy_table(f"defend-eval: {r['n_examples']} images of {r['data']['dataset']} "
                                     f"({r['data']['split']}{part})", rows))
    d = r["defense"]
    out_console.print(summary_table("defence", [
        ("mask", f"{r['mask']} (layer {r['layer']}, k = {r['k']})"),
        ("smoothing", f"σ = {d['sigma']}, n_s = {d['n_smooth']}" if d["rs"] else "off"),
        ("τ", str(d["tau"])), ("seed", str(r["seed"])), ("seconds", f"{r['seconds']:.1f}")]))
    if "report" in r:
        out_console.print(per_class_table(r["classes"], r["per_class"]))
        out_console.print(f"report -> {r['report']}")
