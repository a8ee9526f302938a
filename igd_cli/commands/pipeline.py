"""``igd pipeline``: rank -> calibrate-k -> transfer sets -> defend-eval, cached in one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..calibrate import parse_k
from ..defense import DEFAULT_N_SMOOTH, DEFAULT_TAU
from ..cli import app, emit, examples
from ..common import open_target, parse_eps
from ..console import out_console
from ..errors import IgdError
from ..evaluate import Budgets, render_table
from ..locks import DEFAULT_WAIT, LockOptions
from ..batching import parse_batch_size
from ..options import (Arch, AutoBatchSize, BpdaTemperature, DataDir, Dataset, DefenseOpt, Device, Draws, EpsSigma, Json, Model,
                       NSmooth, Normalize, Numerics, PipelineProbeDataset, Precision, PresetEotIter, PresetQueries,
                       PresetRestarts, PresetSteps, ProtocolOpt, Seed, Sigma, Tau, ThreatModel, ZooDataset)
from ..numerics import describe
from ..precision import check_precision
from ..scoring import DEFAULT_DRAWS, check_protocol
from ..pipeline import PipelineConfig, calibration_caption, parse_piece, preset_values, run_pipeline


@app.command("pipeline", short_help="the whole method, cached: rank, calibrate-k, attacks, eval", epilog=examples(
    "igd pipeline --model demo --preset quick --n-examples 50 --out runs/demo",
    "igd pipeline --model Addepalli2022Efficient_RN18 --device cuda --out runs/rn18   # needs a download and a GPU"))
def pipeline_cmd(
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    normalize: Normalize = None,
    threat_model: ThreatModel = "Linf",
    layer: Annotated[Optional[list[str]], typer.Option(
        "--layer", metavar="LAYER", help="masked layer (default: as igd rank: the penultimate layer, or the module feeding the classifier); repeat it to mask several layers at once")] = None,
    zoo_dataset: ZooDataset = None,
    probe_dataset: PipelineProbeDataset = None,
    allow_overlap: Annotated[bool, typer.Option("--allow-overlap", help="accept ranking on the evaluation images "
                                                "(a --dataset file without --probe-dataset); the paper ranks on "
                                                "training images")] = False,
    method: Annotated[str, typer.Option("--method", metavar="lo-ir|cd-ir|random", help="lo-ir | cd-ir | random")] = "lo-ir",
    attack: Annotated[str, typer.Option("--attack", metavar="iw-wc|aa", help="iw-wc (the paper's nine attacks) | aa (AutoAttack)")] = "iw-wc",
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="run folder for every artifact (default runs/<model>)")] = None,
    n_probe: Annotated[Optional[int], typer.Option("--n-probe", metavar="N", min=1, help="ranking: first N probe images (the training split, or --probe-dataset; default all)")] = None,
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", metavar="N", min=1, help="evaluation: the first N test images (default: the --preset's: quick 200, paper all up to 1000)")] = None,
    calibration_images: Annotated[str, typer.Option("--calibration-images", metavar="after|train|evaluated", help=
        "the images k is chosen on: after (the test images right after the evaluated ones), train (the training "
        "images right after the --n-probe ranking images) or evaluated (the evaluated images themselves, as the "
        "paper did: k is then tuned on the images the figures report on)")] = "after",
    n_calibration: Annotated[Optional[int], typer.Option("--n-calibration", metavar="N", min=1, help=
        "calibrate-k's images (default: as many as are evaluated, or as many as remain)")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", metavar="PTS", help="calibrate-k: allowed clean-accuracy drop, points")] = 0.5,
    sigma: Sigma = None, tau: Tau = DEFAULT_TAU, n_smooth: NSmooth = DEFAULT_N_SMOOTH,
    k: Annotated[Optional[list[str]], typer.Option(
        "--k", metavar="K|LAYER=K", help="use this k instead of calibrating it (several layers: LAYER=K, repeatable)")] = None,
    eps: EpsSigma = None,
    no_rs: Annotated[bool, typer.Option("--no-rs", help="defence without randomized smoothing")] = False,
    defense_spec: DefenseOpt = None,
    steps: PresetSteps = None,
    restarts: PresetRestarts = None,
    queries: PresetQueries = None,
    eot_iter: PresetEotIter = None,
    bpda_temperature: BpdaTemperature = None,
    clip_model: Annotated[str, typer.Option("--clip-model", metavar="NAME", help="cd-ir: open_clip model")] = "ViT-B-16",
    clip_pretrained: Annotated[str, typer.Option("--clip-pretrained", metavar="TAG|PATH", help="cd-ir: weights tag, PATH or none")] = "openai",
    batch_size: AutoBatchSize = "128", seed: Seed = 0, device: Device = "auto",
    numerics: Numerics = "pinned",
    precision: Precision = "fp32",
    draws: Draws = DEFAULT_DRAWS,
    protocol: ProtocolOpt = "draws",
    preset: Annotated[str, typer.Option("--preset", metavar="auto|quick|paper", help="attack budgets and images when not given: paper (the paper's), quick (200 images, 20 steps, 1000 queries, 5 EoT samples, 1 restart) or auto (quick for demo, else paper)")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="recompute every stage even when its artifact matches")] = False,
    piece: Annotated[Optional[str], typer.Option("--piece", metavar="PIECE", help="compute one piece of the run, for job arrays: "
                                                 "rank:A:B (importance rows A..B-1), rank (the whole ranking from "
                                                 "its pieces, then stop), calibrate, transfer:I/N or defend:I/N "
                                                 "(shard I of N of the images), merge (the evaluation report from "
                                                 "its defend pieces); a run without --piece merges the complete "
                                                 "pieces it finds")] = None,
    lock_dir: Annotated[Optional[str], typer.Option("--lock-dir", metavar="DIR|none", envvar="IGD_LOCK_DIR", help=
                                                    "keep the run folder's locks in DIR (for a run folder on a file "
                                                    "system without file locks, e.g. Lustre without -o flock: a "
                                                    "folder whose locks every node sees), or none: no lock")] = None,
    lock_wait: Annotated[float, typer.Option("--lock-wait", metavar="SECONDS", envvar="IGD_LOCK_WAIT", min=0, help=
                                                     "how long to wait for a run folder (or piece) another process "
                                                     "holds before failing")] = DEFAULT_WAIT,
    as_json: Json = False,
) -> None:
    """Run the whole method with cached artifacts and print base vs defended clean and worst-case accuracy.

    Stages: rank (importance) -> calibrate-k (mask) -> attacks on the base model (transfer sets) -> defend-eval.
    Every artifact goes into --out and is reused when it matches (model fingerprint, settings, the file it was
    built from): a second run with the same arguments only re-reads results; an interrupted one resumes.
    With --defense FILE.py:NAME (your own defence, docs/own-defense.md) there is nothing to rank or calibrate:
    the run is the transfer sets and the defended evaluation, with the same cache and pieces.
    """
    if defense_spec is not None:  # IG-Defense's own options say nothing about a user's defence: refused, not ignored
        given = [name for name, v in (("--layer", layer), ("--k", k), ("--sigma", sigma), ("--n-probe", n_probe),
                                      ("--probe-dataset", probe_dataset), ("--n-calibration", n_calibration),
                                      ("--no-rs", no_rs or None), ("--allow-overlap", allow_overlap or None),
                                      ("--method", None if method == "lo-ir" else method),
                                      ("--tolerance", None if tolerance == 0.5 else tolerance),
                                      ("--tau", None if tau == DEFAULT_TAU else tau),
                                      ("--n-smooth", None if n_smooth == DEFAULT_N_SMOOTH else n_smooth),
                                      ("--calibration-images", None if calibration_images == "after" else 1))
                 if v]
        if given:
            raise IgdError(f"{', '.join(given)}: IG-Defense's ranking, calibration and settings, not a --defense's")
    lock = LockOptions(lock_dir, lock_wait)
    check_protocol(protocol, draws)
    check_precision(precision)
    batch = parse_batch_size(batch_size)
    if bpda_temperature is not None and not bpda_temperature >= 1:
        raise IgdError(f"--bpda-temperature {bpda_temperature}: must be at least 1")
    target = open_target(model, arch, dataset, threat_model, device, zoo_dataset, normalize=normalize,
                         numerics=numerics)
    check_precision(precision, target.device)
    p = preset_values(preset, target.loaded.name)

    def pick(value, key):
        return value if value is not None else p[key]

    cfg = PipelineConfig(layer=(layer[0] if len(layer) == 1 else list(layer)) if layer else None, method=method,
                         attack=attack.strip().lower(), n_probe=n_probe,
                         probe_dataset=probe_dataset, allow_overlap=allow_overlap,
                         n_examples=pick(n_examples, "n_examples"), calibration_images=calibration_images,
                         n_calibration=n_calibration, tolerance=tolerance, k=parse_k(k), eps=parse_eps(eps),
                         rs=not no_rs, sigma=sigma, tau=tau, n_smooth=n_smooth,
                         budgets=Budgets(steps=pick(steps, "steps"), restarts=pick(restarts, "restarts"),
                                                       queries=pick(queries, "queries"),
                                                       eot_iter=pick(eot_iter, "eot_iter")),
                         clip_model=clip_model, clip_pretrained=clip_pretrained, batch_size=batch, seed=seed,
                         protocol=protocol, draws=draws, bpda_temperature=bpda_temperature, precision=precision,
                         defense=defense_spec)
    if out is None:
        out = Path("runs") / Path(target.loaded.name).stem.replace(":", "-")
    res = run_pipeline(target, cfg, out, data_dir=data_dir, force=force, piece=parse_piece(piece), lock=lock)
    if isinstance(res, dict):  # one piece: what it wrote
        emit(res, as_json, lambda r: out_console.print(f"piece {r['piece']} -> {r['out']}", highlight=False))
        return
    result = res.to_json()
    result["preset"] = p["preset"]
    result["budgets"] = {k: v for k, v in vars(cfg.budgets).items()}
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    if r.get("defense"):
        where = f"defence {r['defense']['spec']}"
    elif isinstance(r["k"], int):
        where = f"k = {r['k']} of {r['n_neurons']} at {r['layer']}"
    else:
        where = "k = " + ", ".join(f"{r['k'][name]} of {r['n_neurons'][name]} at {name}" for name in r["k"])
    render_table(r, title=f"igd pipeline: accuracy (%), {r['n_examples']} evaluation images, ε={r['eps']:.4g}, {where}")
    stages = ", ".join(f"{k} {v}" for k, v in r["stages"].items())
    budgets = ", ".join(f"{k} {v}" for k, v in r["budgets"].items() if v is not None) or "the paper's"
    out_console.print(f"budgets ({r['preset']} preset): {budgets}")
    probe = r.get("probe") or {}
    if probe:
        split = "" if probe.get("file") else f" ({probe.get('split')} split)"
        out_console.print(f"ranked on the first {probe.get('n')} images of {probe.get('dataset')}{split}",
                          highlight=False)
    images = (r.get("calibration") or {}).get("images")
    if images:
        out_console.print(calibration_caption(images, r["n_examples"]), highlight=False)
    out_console.print(f"numerics: {describe(r.get('numerics'))}", highlight=False)
    out_console.print(f"stages: {stages}; {r['seconds']:.1f} s; artifacts in {r['paths']['out']}")
