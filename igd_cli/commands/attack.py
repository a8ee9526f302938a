"""``igd attack``: run one attack on the base model (or the defended model with ``--mask``) and write the
adversarial set artifact (``x_adv``, ``y``, ``index``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from .. import contract
from ..attacks import ATTACKS, attack_class, make_attack, run_attack
from ..cli import app, emit, examples
from ..common import check_classes, open_target, parse_eps
from ..console import out_console
from ..errors import IgdError
from ..attacks.base import gather
from ..evaluate import identity_of, save_adversarial, score_meta, set_meta
from ..batching import attack_trial, choose_batch_size, parse_batch_size
from ..options import (Arch, AutoBatchSize, BpdaTemperature, DataDir, Dataset, DefenseOpt, Device, Draws, EotIter, Eps, Json, Model, Numerics, ProtocolOpt,
                       Queries, Restarts, Seed, Normalize, Shard, Steps, ThreatModel, ZooDataset)
from ..scoring import DEFAULT_DRAWS, check_protocol, score_set
from ..shards import parse_shard  # noqa: F401  (shared with defend-eval; importable from here as before)

#: igd attack's default --batch-size (what ``auto`` is on a CPU)
ATTACK_BATCH = 128


@app.command("attack", short_help="adversarial examples against the base or defended model", epilog=examples(
    "igd attack --model demo --attack apgd-ce --steps 20 --n-examples 100 --out adv.safetensors",
    "igd attack --model demo --mask mask.safetensors --attack apgd-eot --steps 10 --eot-iter 5 --n-examples 100 --out adv-defended.safetensors"))
def attack_cmd(
    model: Model = "demo",
    attack: Annotated[str, typer.Option("--attack", metavar="NAME", help=f"one of {', '.join(ATTACKS)}")] = ...,
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="adversarial set to write (.safetensors)")] = ...,
    mask: Annotated[Optional[Path], typer.Option("--mask", metavar="FILE", help="attack the defended model with this mask artifact")] = None,
    defense_spec: DefenseOpt = None,
    eps: Eps = None,
    n_examples: Annotated[Optional[int], typer.Option("--n-examples", metavar="N", min=1, help="the first N test images (default: the first 1000, or all if fewer)")] = None,
    steps: Steps = None,
    restarts: Restarts = None,
    queries: Queries = None,
    eot_iter: EotIter = None,
    bpda_temperature: BpdaTemperature = None,
    shard: Shard = None,
    arch: Arch = None,
    normalize: Normalize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf",
    zoo_dataset: ZooDataset = None,
    device: Device = "auto",
    numerics: Numerics = "pinned",
    batch_size: AutoBatchSize = "128",
    seed: Seed = 0,
    draws: Draws = DEFAULT_DRAWS,
    protocol: ProtocolOpt = "draws",
    as_json: Json = False,
) -> None:
    """Attack the base model (or the defended model: --mask, or your own --defense FILE.py:NAME) and write the
    adversarial set.

    The robust accuracy printed is the protocol's over {clean, adversarial}: exact for a deterministic model,
    mean ± std over --draws fresh draws for a randomized defence."""
    attack_class(attack)  # unknown names fail before any model is loaded
    contract.check_exclusive(mask, defense_spec)
    if bpda_temperature is not None and attack != "adaptive":
        raise IgdError(f"--bpda-temperature: only --attack adaptive uses it, not {attack}")
    if bpda_temperature is not None and not bpda_temperature >= 1:
        raise IgdError(f"--bpda-temperature {bpda_temperature}: must be at least 1")
    check_protocol(protocol, draws)
    parse_batch_size(batch_size)
    eps_v = parse_eps(eps)
    if threat_model not in ("Linf", "L2"):
        raise IgdError(f"--threat-model {threat_model}: expected Linf or L2")
    if out.exists() and out.is_dir():
        raise IgdError(f"--out {out}: is a directory")
    target = open_target(model, arch, dataset, threat_model, device, zoo_dataset, normalize=normalize,
                         numerics=numerics)
    data = target.eval_data("test", n_examples, data_dir)
    check_classes(target, data)
    if eps_v is None:
        eps_v = target.default_eps("the attack's budget")
    sh = parse_shard(shard, len(data))
    positions = torch.arange(len(data), dtype=torch.int64) if sh is None else torch.arange(sh[2], sh[3])

    attacked = target.model
    kind = "base"
    extra: dict = {}
    defended = contract.open_defense(target, mask, defense_spec, seed=seed, required=False)
    if defended is not None:
        attacked = defended
        kind = "defended"
        extra["defense"] = identity_of(defended, mask)
        if mask is not None:
            extra["mask_sha256"] = extra["defense"]["mask_sha256"]
    atk = make_attack(attack, attacked, eps=eps_v, norm=threat_model, seed=seed, device=target.device,
                      num_classes=target.loaded.num_classes, steps=steps, restarts=restarts, queries=queries,
                      eot_iter=eot_iter, bpda_temperature=bpda_temperature)
    choice = choose_batch_size(batch_size, default=ATTACK_BATCH, device=target.device, cap=len(positions),
                               try_batch=attack_trial([attacked], data, attack, eps=eps_v, norm=threat_model,
                                                      num_classes=target.loaded.num_classes, seed=seed),
                               what=f"{attack} on the {kind} model")
    batch_size = choice.size
    start = time.perf_counter()
    res = run_attack(atk, data, batch_size=batch_size, positions=positions, description=f"{kind} {attack}")
    x_clean, _ = gather(data, positions)
    clean, robust = score_set(attacked, x_clean, res.x_adv, res.y, res.index, protocol=protocol, draws=draws,
                              seed=seed, batch_size=batch_size)
    seconds = time.perf_counter() - start
    if sh is not None:
        extra["shard"] = [sh[0], sh[1]]
    extra.update({"seconds": round(seconds, 3), "n_attacked": len(positions), "batch_size": batch_size,
                  **score_meta(robust, protocol), "clean_accuracy": clean.mean, "clean_accuracy_std": clean.std,
                  "clean_score": clean.to_json()})
    meta = set_meta(target.provenance(), atk.describe(), kind, data, robust.mean, extra)
    save_adversarial(out, res, meta)
    result = {"out": str(out), "attack": attack, "target": kind, "robust_accuracy": robust.mean,
              "robust_accuracy_std": robust.std, "n_examples": len(positions), "seconds": round(seconds, 3),
              "clean_accuracy": clean.mean, "clean_accuracy_std": clean.std, "draws": robust.draws,
              "protocol": protocol, "eps": eps_v, "budget": atk.budget, "seed": seed, "batch_size": batch_size,
              "auto_batch": choice.to_json(), **target.record()}
    if sh is not None:
        result["shard"] = [sh[0], sh[1]]
    emit(result, as_json, _render)


def _budget(budget: dict | None) -> str:
    """``steps 100, restarts 1`` (— for an attack without one)."""
    return ", ".join(f"{k} {v}" for k, v in (budget or {}).items() if v is not None) or "—"


def _render(r: dict) -> None:
    spread = (lambda k: f" ± {100 * r[k + '_std']:.2f}") if r["draws"] > 1 else (lambda k: "")
    how = f" (mean ± std over {r['draws']} draws)" if r["draws"] > 1 else ""
    out_console.print(f"[bold]{r['attack']}[/bold] on the {r['target']} model, ε={r['eps']:.4g}, "
                      f"budget {_budget(r['budget'])}: clean {100 * r['clean_accuracy']:.2f}{spread('clean_accuracy')}%"
                      f" → robust [bold]{100 * r['robust_accuracy']:.2f}{spread('robust_accuracy')}%[/bold]{how} "
                      f"on {r['n_examples']} images ({r['seconds']:.1f} s) → {r['out']}")
