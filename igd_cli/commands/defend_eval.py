"""``igd defend-eval``: clean and robust accuracy of the base and the defended model.

Parsing and rendering only: the evaluation, its identity and the report are :func:`igd_cli.evaluate.defend_eval`.
A randomized defence is scored by repeated draws (``--draws``, ``--protocol``; :mod:`igd_cli.scoring`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..adv_files import expand_adv
from ..cli import app, emit, examples
from ..common import check_classes, open_target, parse_eps
from ..console import out_console
from .. import contract
from ..defense import check_settings
from ..errors import IgdError
from ..evaluate import Budgets, defend_eval, render_per_class, render_table
from ..batching import attack_trial, choose_batch_size, defended_trial, parse_batch_size
from ..options import (Arch, AutoBatchSize, BpdaTemperature, DataDir, Dataset, DefenseOpt, Device, Draws, EotIter, Eps, Json, Model, Numerics, Precision, ProtocolOpt,
                       Queries, Restarts, Seed, Normalize, Shard, Steps, ThreatModel, ZooDataset)
from ..precision import check_precision
from ..report import summary_table
from ..scoring import DEFAULT_DRAWS, check_protocol
from ..shards import parse_shard


#: the default --batch-size (every command's: results do not depend on it, docs/same-answer.md)
EVAL_BATCH = 128


@app.command("defend-eval", short_help="clean and robust accuracy, base vs defended model", epilog=examples(
    "igd defend-eval --model demo --mask mask.safetensors --n-examples 100",
    "igd defend-eval --model demo --mask mask.safetensors --n-examples 100 --adv adv.safetensors"))
def defend_eval_cmd(
    mask: Annotated[Optional[Path], typer.Option("--mask", metavar="FILE", help="mask artifact from igd calibrate-k "
                                                 "(IG-Defense; or give --defense)")] = None,
    defense_spec: DefenseOpt = None,
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    normalize: Normalize = None,
    threat_model: ThreatModel = "Linf",
    zoo_dataset: ZooDataset = None,
    attack: Annotated[str, typer.Option("--attack", metavar="none|NAME|iw-wc", help="none (clean accuracy only), an attack NAME, or iw-wc")] = "none",
    adv: Annotated[Optional[list[Path]], typer.Option("--adv", metavar="FILE|DIR", help="ready-made adversarial set to "
                                                      "evaluate, or a folder: every set in it (repeat --adv for more)")] = None,
    split: Annotated[str, typer.Option("--split", metavar="train|test", help="data split to evaluate on")] = "test",
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", metavar="N", min=1, help="the first N images of the split (default: the first 1000, or all if fewer)")] = None,
    eps: Eps = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", metavar="S", help="smoothing noise std (default: the mask's)")] = None,
    n_smooth: Annotated[Optional[int], typer.Option("--n-smooth", metavar="N", min=1, help="noise samples (default: the mask's)")] = None,
    tau: Annotated[Optional[float], typer.Option("--tau", metavar="T", help="soft pseudo-label temperature (default: the mask's)")] = None,
    rs: Annotated[Optional[bool], typer.Option("--rs/--no-rs", help="randomized smoothing on/off (default: the mask's)")] = None,
    steps: Steps = None,
    restarts: Restarts = None,
    queries: Queries = None,
    eot_iter: EotIter = None,
    bpda_temperature: BpdaTemperature = None,
    draws: Draws = DEFAULT_DRAWS,
    protocol: ProtocolOpt = "draws",
    workdir: Annotated[Optional[Path], typer.Option("--workdir", metavar="DIR", help="where attack sets are kept and resumed "
                                                    "(default: $IGD_HOME/adv/<model fingerprint>)")] = None,
    skip: Annotated[bool, typer.Option("--skip/--no-skip", help="IW-WC: attack the defended model only on images "
                                       "where it can still change the worst case (same worst case, faster)")] = True,
    shard: Shard = None,
    batch_size: AutoBatchSize = "128", seed: Seed = 0, device: Device = "auto",
    numerics: Numerics = "pinned",
    precision: Precision = "fp32",
    report: Annotated[Optional[Path], typer.Option("--out", "--report", metavar="FILE", help="write an eval-report artifact (--report is the same option): per-image, "
                                                   "per-draw correctness and per-class accuracy")] = None,
    as_json: Json = False,
) -> None:
    """Clean accuracy of the base and the defended model (--attack none), or robust accuracy under attacks.

    The defended model is IG-Defense from --mask, or your own defence from --defense FILE.py:NAME
    (docs/own-defense.md); with either, --attack iw-wc adds the adaptive column after the paper's nine.

    A randomized defence (smoothing on) is scored as Croce et al. score randomized defences: every point is
    classified --draws times, per image the point with the lowest mean correctness is selected and scored on as
    many fresh draws; the worst case is reported as mean ± std, majority vote and all draws.
    """
    attack = attack.strip().lower()
    contract.check_exclusive(mask, defense_spec)
    if mask is None and defense_spec is None:
        raise IgdError("no defended model: give --mask FILE (IG-Defense) or --defense FILE.py:NAME (your own)")
    check_protocol(protocol, draws)
    check_precision(precision)
    parse_batch_size(batch_size)
    if n_smooth is not None or tau is not None or sigma is not None:
        check_settings(tau=1.0 if tau is None else tau, sigma=sigma, n_smooth=1 if n_smooth is None else n_smooth,
                       rs=False)
    budgets = Budgets(steps=steps, restarts=restarts, queries=queries, eot_iter=eot_iter)
    for name, v in budgets.kwargs().items():
        if v is not None and v < 1:
            raise IgdError(f"--{name.replace('_', '-')} {v}: must be at least 1")
    if attack == "none" and any(v is not None for v in budgets.kwargs().values()):
        raise IgdError("--steps/--restarts/--queries/--eot-iter set attack budgets: give --attack NAME or iw-wc")
    if bpda_temperature is not None and attack not in ("adaptive", "iw-wc"):
        raise IgdError(f"--bpda-temperature: the adaptive attack's, used by --attack adaptive or iw-wc, not {attack}")
    if bpda_temperature is not None and not bpda_temperature >= 1:
        raise IgdError(f"--bpda-temperature {bpda_temperature}: must be at least 1")
    if report is not None and report.is_dir():
        raise IgdError(f"--out {report}: is a directory")
    adv_files = expand_adv(adv or [])  # a folder: every adversarial set in it
    target = open_target(model, arch, dataset, threat_model, device, zoo_dataset, normalize=normalize,
                         numerics=numerics)
    check_precision(precision, target.device)
    eps_value = parse_eps(eps)
    defense = contract.open_defense(target, mask, defense_spec, seed=seed, sigma=sigma, n_smooth=n_smooth, tau=tau,
                                    rs=rs)
    data = target.eval_data(split, n_examples, data_dir)
    check_classes(target, data)
    trial = None
    if parse_batch_size(batch_size) == "auto" and attack == "none":  # scoring only
        trial = defended_trial(defense, data, precision)
    elif parse_batch_size(batch_size) == "auto":  # the attacks (fp32) with their state, on both models
        trial = attack_trial([defense, target.model], data, attack, eps=eps_value if eps_value is not None
                             else target.default_eps("the attacks' budget"), norm=threat_model,
                             num_classes=target.loaded.num_classes, seed=seed)
    choice = choose_batch_size(batch_size, default=EVAL_BATCH, device=target.device, cap=len(data), try_batch=trial,
                               what="the defended model's " + ("clean scoring" if attack == "none" else attack))
    bs = choice.size
    _, result = defend_eval(target, defense, mask, data, attack=attack, adv=adv_files, eps=eps_value,
                            norm=threat_model, budgets=budgets, workdir=workdir, skip=skip,
                            shard=parse_shard(shard, len(data)), seed=seed, batch_size=bs,
                            protocol=protocol, draws=draws, report=report, bpda_temperature=bpda_temperature,
                            precision=precision)
    result["auto_batch"] = choice.to_json()
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    part = f" (shard {r['shard'][0]}/{r['shard'][1]}: images {r['positions'][0]}..{r['positions'][1] - 1})" \
        if "shard" in r else ""
    eps = f", ε={r['eps']:.4g}" if r.get("eps") is not None else ""
    what = "--adv" if r["attack"] == "none" and r["robust_accuracy"] else f"--attack {r['attack']}"
    render_table(r, title=f"defend-eval {what}: accuracy (%), {r['n_examples']} images of "
                          f"{r['data']['dataset']} ({r['data']['split']}){part}{eps}")
    d = r["defense"] or {}
    if r.get("mask") is None:  # a --defense
        rows = [("defence", str(r.get("defense_spec"))), ("randomized", "yes" if r.get("randomized") else "no"),
                *((str(k), str(v)) for k, v in d.items())]
        if r.get("no_gradient"):
            rows.append(("no gradient", ", ".join(r["no_gradient"])))
    else:
        rows = [("mask", f"{r['mask']} (layer {r['layer']}, k = {r['k']})"),
                ("smoothing", f"σ = {d.get('sigma')}, n_s = {d.get('n_smooth')}" if d.get("rs") else "off"),
                ("τ", str(d.get("tau")))]
    out_console.print(summary_table("defence", [*rows, ("seed", str(r["seed"])),
                                                ("seconds", f"{r['seconds_total']:.1f}")]))
    if "report" in r:
        render_per_class(r)
        out_console.print(f"report -> {r['report']}")
