"""``igd audit``: the gradient-masking and randomness checklist on a model and its defence (parse, call
:mod:`igd_cli.audit`, render). Exit code 0 whatever the verdicts: flags are findings, not errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..audit import CHECKS, PRESETS, Audit, parse_checks, render_audit, run_audit
from ..cli import app, emit, examples
from ..common import check_classes, open_target, parse_eps
from .. import contract
from ..errors import IgdError
from ..evaluate import default_workdir
from ..batching import attack_trial, choose_batch_size, parse_batch_size
from ..options import (Arch, AuditEps, AutoBatchSize, DataDir, Dataset, DefenseOpt, Device, Draws, Json, Model, Normalize, Numerics, CountsProtocolOpt,
                       Seed, ZooDataset)
from ..scoring import DEFAULT_DRAWS, check_protocol

#: igd audit's default --batch-size (what ``auto`` is on a CPU)
AUDIT_BATCH = 128


@app.command("audit", short_help="the gradient-masking and randomness checklist, judged", epilog=examples(
    "igd audit --model demo --mask mask.safetensors --n-examples 20 --checks 9",
    "igd audit --model demo --mask mask.safetensors --n-examples 20 --checks 6 --plot-dir plots"))
def audit_cmd(
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    zoo_dataset: ZooDataset = None, normalize: Normalize = None,
    mask: Annotated[Optional[Path], typer.Option("--mask", metavar="FILE", help="mask artifact from igd calibrate-k: audit the "
                                                 "defended model (without it or --defense: the base model; checks 7-11 n/a)")] = None,
    defense_spec: DefenseOpt = None,
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", metavar="N", min=1, help="the first N test images (default: "
                                                      "the preset's: quick 100, fewer than the pipeline's 200 because "
                                                      "the audit runs many more attacks; paper 1000; at most all)")] = None,
    preset: Annotated[str, typer.Option("--preset", metavar="quick|paper", help="attack budgets and images: quick (the "
                                        "pipeline's quick budgets) or paper. The default is quick on every model, "
                                        "not auto as in pipeline and analyze: the paper's budgets over the audit's "
                                        "many attacks take hours without a GPU")] = "quick",
    checks: Annotated[Optional[str], typer.Option("--checks", metavar="LIST", help=f"which checks, e.g. 1,2,6 (default: all {len(CHECKS)})")] = None,
    plot_dir: Annotated[Optional[Path], typer.Option("--out", "--plot-dir", metavar="DIR", help="folder for the audit's "
                                                     "plots: surface.png, steps.png, budget.png (--plot-dir is the same option)")] = None,
    eps: AuditEps = None,
    split: Annotated[str, typer.Option("--split", metavar="train|test", help="data split to audit on")] = "test",
    workdir: Annotated[Optional[Path], typer.Option("--workdir", metavar="DIR", help="where attack sets are kept and reused, e.g. "
                                                    "a pipeline's RUN/adv (default: $IGD_HOME/adv/<fingerprint>)")] = None,
    draws: Draws = DEFAULT_DRAWS, protocol: CountsProtocolOpt = "draws",
    batch_size: AutoBatchSize = "128", seed: Seed = 0, device: Device = "auto", numerics: Numerics = "pinned",
    as_json: Json = False,
) -> None:
    """Is this robustness real? Runs the gradient-masking and randomness checklist (AutoAttack's flags, black
    box vs white box, stronger AutoAttack, steps, budget, loss surface, transfer vs direct, frozen noise, does
    the mask act, smoothing alone, and the adaptive attack beyond the paper) and prints one table: figures and verdict (ok / flag) per check.

    A randomized defence is scored by repeated draws (mean ± std over --draws draws; --protocol single-draw
    scores one draw, which check 1 flags). Every comparison is a paired per-image test (docs/audit.md). Exit code
    0 whatever the verdicts.
    """
    check_protocol(protocol, draws, "igd audit")
    parse_batch_size(batch_size)
    if preset not in PRESETS:
        raise IgdError(f"--preset {preset}: expected {' or '.join(PRESETS)}")
    wanted = parse_checks(checks)
    if n_examples is not None and n_examples < 1:
        raise IgdError(f"--n-examples {n_examples}: must be at least 1")
    if plot_dir is not None and plot_dir.exists() and not plot_dir.is_dir():
        raise IgdError(f"--out {plot_dir}: exists and is not a directory")
    eps_v = parse_eps(eps)
    target = open_target(model, arch, dataset, "Linf", device, zoo_dataset, normalize=normalize,
                         numerics=numerics)
    defense = contract.open_defense(target, mask, defense_spec, seed=seed, required=False)
    n = n_examples if n_examples is not None else PRESETS[preset]["n_examples"]
    data = target.data(split, n, data_dir) if n_examples is not None else _first(target, split, n, data_dir)
    check_classes(target, data)
    eps_v = eps_v if eps_v is not None else target.default_eps("the audit's attacks")
    models = [target.model] if defense is None else [defense, target.model]
    choice = choose_batch_size(batch_size, default=AUDIT_BATCH, device=target.device, cap=len(data),
                               try_batch=attack_trial(models, data, "iw-wc", eps=eps_v,
                                                      num_classes=target.loaded.num_classes, seed=seed),
                               what="the audit's attacks")
    audit = Audit(target, data, eps=eps_v, preset=preset, defense=defense, mask_path=mask,
                  workdir=workdir or default_workdir(target), seed=seed, batch_size=choice.size, draws=draws,
                  protocol=protocol)
    result = run_audit(audit, wanted, plot_dir)
    result["auto_batch"] = choice.to_json()
    emit(result, as_json, render_audit)


def _first(target, split: str, n: int, data_dir: Path | None):
    """The preset's image count, or all images of a smaller split."""
    full = target.data(split, None, data_dir)
    return full if len(full) <= n else target.data(split, n, data_dir)
