"""``igd analyze shift|ablation|sweep``: the paper's Sec. 3 analysis, Table 6 ablation and sensitivity sweeps.

Parsing and rendering only: the analyses are :mod:`igd_cli.analysis`. Every result is written as JSON and PNG into
the run folder ``--out`` (default ``runs/<model>``, the folder ``igd pipeline`` uses), whose attack sets
(``adv/``) are shared, and ``igd report`` renders the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from ..analysis.ablation import analyze_ablation
from ..analysis.setup import load_rankings, make_setup
from ..analysis.shift import PGD_STEPS, analyze_shift
from ..analysis.sweep import OVER, SweepSpec, analyze_sweep, parse_value
from ..batching import attack_trial, choose_batch_size, defended_trial, parse_batch_size
from ..cli import app, emit, examples
from ..common import open_target, parse_eps
from ..console import out_console, progress_enabled
from ..defense import DEFAULT_N_SMOOTH, DEFAULT_TAU
from ..errors import IgdError
from ..evaluate import Budgets
from ..options import (Arch, AutoBatchSize, DataDir, Dataset, Device, Draws, Eps, EpsSigma, Json, Model, Numerics, Normalize,
                       PresetEotIter, PresetQueries, PresetRestarts, PresetSteps, CountsProtocolOpt, Seed, ThreatModel,
                       ZooDataset)
from ..pipeline import preset_values
from ..report import ablation_cells, rich_table, shift_cells, sweep_cells
from ..scoring import DEFAULT_DRAWS

analyze_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, epilog=examples(
    "igd analyze shift --importance imp.safetensors --k 16 --n-examples 100 --out runs/demo",
    "igd analyze sweep --importance imp.safetensors --over k --values 4,16,64 --attack none --n-examples 100 --out runs/demo"),
                          help="The paper's analyses on your model: activation shift (Sec. 3), ablation (Table 6), "
                               "sensitivity sweeps (Figs. 5-7, Table 10).")
app.add_typer(analyze_app, name="analyze", short_help="the paper's analyses: activation shift, ablation, sweeps")

Importance = Annotated[list[Path], typer.Option("--importance", metavar="FILE", help="importance artifact(s) from igd rank")]
K = Annotated[int, typer.Option("--k", metavar="K", min=1, help="neurons kept per class (top-k of the ranking)")]
Out = Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="run folder for the results, plots and attack sets "
                                             "(default runs/<model>, shared with igd pipeline)")]
NExamples = Annotated[Optional[int], typer.Option("--n-examples", metavar="N", min=1, help="the first N test images (default: "
                                                  "the preset's: quick 200, paper the first 1000 or all if fewer)")]
Preset = Annotated[str, typer.Option("--preset", metavar="auto|quick|paper", help="budgets and images when not given: quick, paper or auto "
                                     "(as igd pipeline: quick for demo, else paper)")]


def _setup(model: str, arch: str | None, dataset: str | None, data_dir: Path | None, threat_model: str,
           device: str, out: Path | None, preset: str, n_examples: int | None, eps: str | None,
           budgets: dict[str, int | None], seed: int, batch_size: str, protocol: str, draws: int,
           zoo_dataset: str | None, normalize: str | None, numerics: str):
    fixed = parse_batch_size(batch_size)
    target = open_target(model, arch, dataset, threat_model, device, zoo_dataset, normalize=normalize,
                         numerics=numerics)
    p = preset_values(preset, target.loaded.name)
    pick = {k: (v if v is not None else p[k]) for k, v in budgets.items()}
    out = out if out is not None else Path("runs") / Path(target.loaded.name).stem.replace(":", "-")
    setup = make_setup(target, out, n_examples=n_examples if n_examples is not None else p["n_examples"],
                       data_dir=data_dir, eps=parse_eps(eps), budgets=Budgets(**pick), seed=seed,
                       batch_size=ANALYZE_BATCH if fixed == "auto" else fixed, protocol=protocol, draws=draws,
                       show_progress=progress_enabled())
    out.mkdir(parents=True, exist_ok=True)
    return setup, out, p["preset"]


#: igd analyze's default --batch-size (what ``auto`` is on a CPU)
ANALYZE_BATCH = 128


def _choose_batch(setup, batch_size: str, attack: str, defended: tuple[str, int, dict[str, Any]] | None = None
                  ) -> dict[str, Any] | None:
    """``--batch-size`` of the analysis: with ``auto`` the largest batch of ``attack``'s attacks (``none``: the
    clean scoring) on the base model and, with ``defended`` = (layer, N, settings), the defended model at that
    layer (every neuron kept: which neurons are kept does not change the cost) that fits. Sets the setup's batch
    and returns how it was chosen (None for a fixed batch)."""
    if parse_batch_size(batch_size) != "auto":
        return None
    target = setup.target
    models = [target.model]
    if defended is not None:
        from ..defense import IGDefense

        layer, n, settings = defended
        full = torch.ones(n, target.loaded.num_classes, device=target.device)
        models.insert(0, IGDefense(target.model, layer, full, seed=setup.seed, **settings))
    trial = defended_trial(models[0], setup.data) if attack == "none" else \
        attack_trial(models, setup.data, attack, eps=setup.eps, norm=target.threat_model,
                     num_classes=target.loaded.num_classes, seed=setup.seed)
    choice = choose_batch_size("auto", default=ANALYZE_BATCH, device=target.device, cap=len(setup.data),
                               try_batch=trial, what=f"the analysis' {attack if attack != 'none' else 'scoring'}")
    setup.batch_size = choice.size
    return choice.to_json()


@analyze_app.command("shift", short_help="how an attack shifts the important activations (Sec. 3)",
                     epilog=examples("igd analyze shift --importance imp.safetensors --k 16 --n-examples 100 --out runs/demo"))
def shift_cmd(
    importance: Importance, k: K,
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf", zoo_dataset: ZooDataset = None, normalize: Normalize = None,
    out: Out = None, preset: Preset = "auto", n_examples: NExamples = None,
    eps: Eps = None,
    steps: Annotated[int, typer.Option("--steps", metavar="N", min=1, help="PGD steps (the paper's 50)")] = PGD_STEPS,
    batch_size: AutoBatchSize = "128", seed: Seed = 0, device: Device = "auto", numerics: Numerics = "pinned",
    as_json: Json = False,
) -> None:
    """How a PGD attack on the base model shifts the masked layer's activations (Sec. 3, Eqs. 1-2, Table 7): the
    relative change of the top-k neurons of the ground-truth class, of the post-attack class, of the other
    classes and of the neurons important for no class, for successful and unsuccessful attacks; bar chart PNG
    (Fig. 2C/D)."""
    if len(importance) != 1:
        raise IgdError("--importance: shift takes one ranking")
    setup, out, _ = _setup(model, arch, dataset, data_dir, threat_model, device, out, preset, n_examples, eps,
                           {"steps": None, "restarts": None, "queries": None, "eot_iter": None}, seed, batch_size,
                           "draws", DEFAULT_DRAWS, zoo_dataset, normalize, numerics)
    (name, (path, layer, imp)), = load_rankings(setup.target, importance, setup.data).items()
    auto = _choose_batch(setup, batch_size, "pgd")  # PGD on the base model, then forwards
    result = analyze_shift(setup, name, path, layer, imp, k, out, steps=steps)
    emit({**result, "auto_batch": auto}, as_json, _render_shift)


def _render_shift(r: dict[str, Any]) -> None:
    a = r["attack"]
    out_console.print(rich_table(
        f"activation shift at {r['layer']} (top-{r['k']} of {r['ranking']}, {r['n_unimportant']} of "
        f"{r['n_neurons']} neurons unimportant), PGD-{a['steps']} at argmax loss (δ*, Eq. 1) ε={a['eps']:.4g}, "
        f"{r['n_images']} images "
        f"({r['clean_wrong']} misclassified clean, left out)", shift_cells(r)))
    out_console.print(f"base model: clean {100 * a['clean_accuracy']:.2f}%, PGD {100 * a['robust_accuracy']:.2f}%; "
                      f"% change = 100 · Σ(adv − clean) / Σ|clean| of the group's mean activation. "
                      f"-> {r['json']}, {r['plot']}")


@analyze_app.command("ablation", short_help="the rows of Table 6: clean, AA and IW-WC per component",
                     epilog=examples("igd analyze ablation --importance imp.safetensors --k 16 --n-examples 20 --no-iw-wc --out runs/demo"))
def ablation_cmd(
    importance: Importance, k: K,
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf", zoo_dataset: ZooDataset = None, normalize: Normalize = None,
    out: Out = None, preset: Preset = "auto", n_examples: NExamples = None,
    eps: EpsSigma = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", metavar="S", help="smoothing noise std (default ε/2)")] = None,
    tau: Annotated[float, typer.Option("--tau", metavar="T", help="soft pseudo-label temperature")] = DEFAULT_TAU,
    n_smooth: Annotated[int, typer.Option("--n-smooth", metavar="N", min=1, help="noise samples")] = DEFAULT_N_SMOOTH,
    random_seed: Annotated[int, typer.Option("--random-seed", metavar="INT", help="seed of the random-k row's ranking")] = 0,
    iw_wc: Annotated[bool, typer.Option("--iw-wc/--no-iw-wc", help="the IW-WC column (nine attacks per row)")] = True,
    steps: PresetSteps = None, restarts: PresetRestarts = None, queries: PresetQueries = None,
    eot_iter: PresetEotIter = None,
    draws: Draws = DEFAULT_DRAWS, protocol: CountsProtocolOpt = "draws",
    batch_size: AutoBatchSize = "128", seed: Seed = 0, device: Device = "auto", numerics: Numerics = "pinned",
    as_json: Json = False,
) -> None:
    """The rows of Table 6 — one pass; one pass with smoothing; two passes without a mask; random-k without and
    with smoothing; each --importance ranking's top-k without and with smoothing — with clean, AutoAttack and
    IW-WC accuracy. Transfer sets are made once on the base model and shared by every row; randomized rows are
    scored by repeated draws (mean ± std)."""
    setup, out, _ = _setup(model, arch, dataset, data_dir, threat_model, device, out, preset, n_examples, eps,
                           {"steps": steps, "restarts": restarts, "queries": queries, "eot_iter": eot_iter}, seed,
                           batch_size, protocol, draws, zoo_dataset, normalize, numerics)
    rankings = load_rankings(setup.target, importance, setup.data)
    _, layer, imp = next(iter(rankings.values()))
    auto = _choose_batch(setup, batch_size, "iw-wc" if iw_wc else "aa",
                         (layer, imp.shape[0], {"tau": tau, "n_smooth": n_smooth, "rs": True,
                                                "sigma": sigma if sigma is not None else setup.eps / 2}))
    result = analyze_ablation(setup, rankings, k, out, sigma=sigma, tau=tau, n_smooth=n_smooth,
                              random_seed=random_seed, iw_wc=iw_wc)
    emit({**result, "auto_batch": auto}, as_json, _render_ablation)


def _render_ablation(r: dict[str, Any]) -> None:
    s = r["setup"]
    out_console.print(rich_table(
        f"ablation (Table 6) at {r['layer']}, k = {r['k']}, σ = {r['settings']['sigma']:.4g}: accuracy (%), "
        f"{s['data']['n']} images, ε={s['eps']:.4g}", ablation_cells(r)))
    out_console.print(f"rows with RS are randomized: mean ± std over {s['draws']} final draws ({s['protocol']} "
                      f"protocol); the others are exact. -> {r['json']}, {r['plot']}")


@analyze_app.command("sweep", short_help="accuracy as k, ε, σ, τ, n_s, layer or steps varies", epilog=examples(
    "igd analyze sweep --importance imp.safetensors --over k --values 4,16,64 --attack none --n-examples 100 --out runs/demo",
    "igd analyze sweep --importance imp.safetensors --over sigma --values 0.05,0.1,0.2 --k 16 --attack none --n-examples 100 --out runs/demo"))
def sweep_cmd(
    importance: Importance,
    over: Annotated[str, typer.Option("--over", metavar="SETTING", help=f"the setting to vary: {' | '.join(OVER)}")],
    values: Annotated[list[str], typer.Option("--values", metavar="V,...", help="values of --over (repeat, or comma-separated)")],
    k: Annotated[Optional[int], typer.Option("--k", metavar="K", min=1, help="neurons kept per class at every point (default: "
                                             "the k of --over k's values, else required)")] = None,
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf", zoo_dataset: ZooDataset = None, normalize: Normalize = None,
    out: Out = None, preset: Preset = "auto", n_examples: NExamples = None,
    eps: EpsSigma = None,
    layer: Annotated[Optional[str], typer.Option("--layer", metavar="LAYER", help="with several --importance: the layer of every "
                                                 "point (not with --over layer)")] = None,
    sigma: Annotated[Optional[str], typer.Option("--sigma", metavar="S", help="smoothing noise std (default ε/2 of --eps)")] = None,
    tau: Annotated[float, typer.Option("--tau", metavar="T", help="soft pseudo-label temperature")] = DEFAULT_TAU,
    n_smooth: Annotated[int, typer.Option("--n-smooth", metavar="N", min=1, help="noise samples")] = DEFAULT_N_SMOOTH,
    no_rs: Annotated[bool, typer.Option("--no-rs", help="defence without randomized smoothing")] = False,
    attack: Annotated[str, typer.Option("--attack", metavar="none|NAME|iw-wc", help="robust accuracy under: none, an attack name, or iw-wc")] = "aa",
    steps: PresetSteps = None, restarts: PresetRestarts = None, queries: PresetQueries = None,
    eot_iter: PresetEotIter = None,
    draws: Draws = DEFAULT_DRAWS, protocol: CountsProtocolOpt = "draws",
    batch_size: AutoBatchSize = "128", seed: Seed = 0, device: Device = "auto", numerics: Numerics = "pinned",
    as_json: Json = False,
) -> None:
    """Clean and robust accuracy of the defended model (and the base model) as one setting varies (Figs. 5A-D,
    6A-C, 7C; Table 10); curves as PNG. Every point is cached in OUT/sweep-cache and reused when the sweep is
    extended or another sweep meets it."""
    from ..attacks import attack_class

    over = over.strip().lower()
    attack = attack.strip().lower()
    if attack not in ("none", "iw-wc"):
        attack_class(attack)
    vals = tuple(parse_value(over, v) for item in values for v in item.split(",") if v.strip())
    if k is None:
        if over != "k":
            raise IgdError("--k: required unless --over k")
        k = int(vals[0])
    if over == "layer" and layer is not None:
        raise IgdError("--layer: not with --over layer")
    sig = parse_value("sigma", sigma) if sigma is not None else None
    spec = SweepSpec(over=over, values=vals, k=k, layer=layer, sigma=sig, tau=tau, n_smooth=n_smooth, rs=not no_rs,
                     attack=attack)
    setup, out, _ = _setup(model, arch, dataset, data_dir, threat_model, device, out, preset, n_examples, eps,
                           {"steps": steps, "restarts": restarts, "queries": queries, "eot_iter": eot_iter}, seed,
                           batch_size, protocol, draws, zoo_dataset, normalize, numerics)
    rankings = load_rankings(setup.target, importance, setup.data)
    _, first_layer, imp = next(iter(rankings.values()))
    n_max = max(vals) if over == "n-smooth" else n_smooth  # the most noise samples: the heaviest point
    auto = _choose_batch(setup, batch_size, attack,
                         (first_layer, imp.shape[0], {"tau": tau, "n_smooth": int(n_max), "rs": not no_rs,
                                                      "sigma": sig if sig is not None else setup.eps / 2}))
    emit({**analyze_sweep(setup, rankings, spec, out), "auto_batch": auto}, as_json, _render_sweep)


def _render_sweep(r: dict[str, Any]) -> None:
    s = r["setup"]
    fixed = "" if r["over"] == "k" else f", k = {r['settings']['k']}"
    out_console.print(rich_table(f"sweep over {r['over']}: accuracy (%), {s['data']['n']} images, ε={s['eps']:.4g}"
                                 f"{fixed}", sweep_cells(r)))
    out_console.print(f"{r['computed']} points computed, {r['reused']} reused; randomized points: mean ± std over "
                      f"draws ({s['protocol']} protocol). -> {r['json']}, {r['plot']}")
