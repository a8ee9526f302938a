"""The paper's Sec. 3 analysis (Eqs. 1-2, Table 7, Fig. 2C/D): how an attack shifts the activations of the masked
layer between the neurons important for the ground-truth class, for the post-attack prediction, for the other
classes, and the neurons important for no class.

Definitions (the paper's, made exact). ``a(x)`` is the layer's output averaged over its spatial positions, (N,).
``S_c`` = the top-k neurons of class c (the mask's column c), ``U`` = the neurons in no class's top-k. For an
image, the activation of a neuron set S is the mean of ``a_j`` over j ∈ S (Eq. 1's ``A_c`` averaged over
k × H × W), and a group of classes gets the mean of its classes' values. Only images the model classifies
correctly clean count; an attack is *successful* when it changes that prediction. Per group of images and row:

    Δ% = 100 · Σ_images (act(x + δ) − act(x)) / Σ_images |act(x)|

the relative change of the mean activation (Table 7's "% change w.r.t. the original activation value"; a ratio
of sums, so images with near-zero activation do not blow it up). Rows: ``gt`` (S_y), ``pred`` (S_ŷ*, successful
attacks only), ``rest`` (the classes other than y and ŷ* for successful attacks — Table 7's Δ_rem-cls —, other
than y for unsuccessful ones — Table 7's Δ_non-GT; the paper's text swaps the two names) and ``unimp`` (U).

The adversarial point is Eq. 1's ``δ* = argmax_δ L(f(x + δ), y)``: :class:`MaxLossPGD` keeps, per image, the PGD
iterate with the highest cross-entropy (not the first misclassified one, which stops just past the boundary and
shrinks the shifts).

Example::

    res = activation_shift(model, "block3", importance, k=2, x=x, x_adv=x_adv, y=y)
    res.groups["successful"].percent["gt"]   # < 0 on the paper's models: GT neurons lose activation
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import hashlib
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..artifacts import read_metadata
from ..attacks.base import Attack, AttackResult, gather, image_generators, run_attack
from ..errors import IgdError
from ..console import progress
from ..defense import check_k, importance_ranks
from ..devices import module_device
from ..evaluate import load_set, restrict, save_adversarial, set_meta
from ..layers import capture, resolve_layer
from ..scoring import Score, classify, final_of_selected, final_rows
from .setup import EvalSetup, write_json

Row = Literal["gt", "pred", "rest", "unimp"]
ROWS: tuple[str, ...] = ("gt", "pred", "rest", "unimp")
#: Table 7's column names per group
LABELS = {"gt": "Δ_y (GT class)", "pred": "Δ_ŷ* (post-attack class)", "rest": "Δ_rest (other classes)",
          "unimp": "Δ_unimp (unimportant)"}
#: the paper's attack for this analysis: PGD with 50 steps (Appendix B.1)
PGD_STEPS = 50


@dataclass
class ShiftGroup:
    """One group of images (successful or unsuccessful attacks): image count and, per row, the summed clean and
    adversarial set activations and the relative change in % (None where undefined)."""

    n: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    before_abs: dict[str, float] = field(default_factory=dict)

    @property
    def percent(self) -> dict[str, float | None]:
        return {r: (100 * (self.after[r] - self.before[r]) / self.before_abs[r] if self.before_abs.get(r) else None)
                for r in self.before}

    def to_json(self) -> dict[str, Any]:
        mean = {r: ((self.after[r] - self.before[r]) / self.n if self.n else None) for r in self.before}
        return {"n": self.n, "percent": self.percent, "mean_change": mean,
                "mean_before": {r: (self.before[r] / self.n if self.n else None) for r in self.before}}


@dataclass
class ShiftResult:
    """The metrics of :func:`activation_shift`: ``groups`` successful / unsuccessful, and the images left out
    (misclassified clean)."""

    k: int
    n_neurons: int
    n_unimportant: int
    n_images: int
    clean_wrong: int
    groups: dict[str, ShiftGroup]

    def to_json(self) -> dict[str, Any]:
        return {"k": self.k, "n_neurons": self.n_neurons, "n_unimportant": self.n_unimportant,
                "n_images": self.n_images, "clean_wrong": self.clean_wrong,
                "attack_success_rate": (self.groups["successful"].n / (self.n_images - self.clean_wrong)
                                        if self.n_images > self.clean_wrong else None),
                "groups": {g: v.to_json() for g, v in self.groups.items()}}


def _pooled(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial-mean layer output (B, N), logits) for one batch."""
    with capture(model, layer) as box:
        logits = model(x)
    a = box["out"]
    return (a.flatten(2).mean(2) if a.ndim > 2 else a), logits


@torch.no_grad()
def activation_shift(model: nn.Module, layer: str, importance: torch.Tensor, k: int, x: torch.Tensor,
                     x_adv: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> ShiftResult:
    """Table 7's metrics for the pairs (x, x_adv) with labels y on ``model`` at ``layer`` (top-k of
    ``importance`` per class; definitions in the module docstring)."""
    layer = resolve_layer(model, layer)
    n_neurons, n_classes = importance.shape
    check_k(k, n_neurons)
    sets = (importance_ranks(importance) < k).float()  # (N, C): S_c as columns
    unimp = (sets.sum(1) == 0).float()  # (N,)
    n_unimp = int(unimp.sum())
    device = module_device(model)
    # the rows each group has: no post-attack class when the attack fails, no other classes when none is left,
    # no unimportant neurons when every neuron is in some class's top-k
    rows = {"successful": [r for r in ROWS if not (r == "rest" and n_classes < 3 or r == "unimp" and not n_unimp)],
            "unsuccessful": [r for r in ROWS if r != "pred" and not (r == "unimp" and not n_unimp)]}
    sums = {g: {key: dict.fromkeys(rows[g], 0.0) for key in ("before", "after", "before_abs")}
            for g in rows}
    counts = dict.fromkeys(rows, 0)
    clean_wrong = 0
    s, u = sets.to(device), unimp.to(device)
    with progress() as bar:
        task = bar.add_task("activation shift", total=len(x))
        for i in range(0, len(x), batch_size):
            xb, ab, yb = (t[i:i + batch_size].to(device) for t in (x, x_adv, y))
            a0, l0 = _pooled(model, layer, xb)
            a1, l1 = _pooled(model, layer, ab)
            ok = l0.argmax(1) == yb
            clean_wrong += int((~ok).sum())
            pred = l1.argmax(1)
            gt = torch.nn.functional.one_hot(yb, n_classes).bool()
            pr = torch.nn.functional.one_hot(pred, n_classes).bool()
            for g, sel in (("successful", ok & (pred != yb)), ("unsuccessful", ok & (pred == yb))):
                if not bool(sel.any()):
                    continue
                counts[g] += int(sel.sum())
                rest = (~(gt | pr)[sel]).float()  # for unsuccessful attacks pred == y: every class but y
                for key, a in (("before", a0[sel]), ("after", a1[sel])):
                    per_class = a @ s / k  # (B, C): mean activation of S_c
                    vals = {"gt": per_class[gt[sel]], "pred": per_class[pr[sel]],
                            "rest": (per_class * rest).sum(1) / rest.sum(1).clamp(min=1),
                            "unimp": a @ u / max(n_unimp, 1)}
                    for r in rows[g]:
                        sums[g][key][r] += float(vals[r].double().sum())
                        if key == "before":
                            sums[g]["before_abs"][r] += float(vals[r].double().abs().sum())
            bar.advance(task, len(xb))
    groups = {g: ShiftGroup(counts[g], acc["before"], acc["after"], acc["before_abs"]) for g, acc in sums.items()}
    return ShiftResult(int(k), int(n_neurons), n_unimp, len(x), clean_wrong, groups)


class MaxLossPGD(Attack):
    """ℓ∞ PGD for Eq. 1: igd's ``pgd`` start and steps (a uniform random start per image, ``steps`` signed steps of
    2.5·ε/steps), returning per image the iterate (start and every step, over restarts) with the highest
    cross-entropy, δ* = argmax loss. Written here because igd's ``pgd`` returns the first misclassified iterate
    (an attack-success point) and the field's PGD (Madry et al.; torchattacks) the last one.

    Example::

        x_adv = MaxLossPGD(model, eps=0.2, steps=50)(x, y)
    """

    name = "pgd-maxloss"
    defaults = {"steps": PGD_STEPS, "restarts": 1}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        steps, eps = self.budget["steps"], self.eps
        alpha = 2.5 * eps / steps
        gens = image_generators(self.seed, index)
        best = x.clone()
        best_loss = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)
        for _ in range(self.budget["restarts"]):
            noise = torch.stack([torch.rand(x.shape[1:], generator=g) for g in gens]).to(x.device)
            xa = (x + (2 * noise - 1) * eps).clamp(0, 1)
            for it in range(steps + 1):
                xr = xa.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(self.model(xr), y, reduction="none")
                    g, = torch.autograd.grad(loss.sum(), [xr]) if it < steps else (None,)
                loss = loss.detach()
                better = loss > best_loss
                best[better], best_loss[better] = xa[better], loss[better]
                if it < steps:
                    xa = torch.min(torch.max(xa + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        return best


def _maxloss_set(setup: EvalSetup, steps: int) -> tuple[AttackResult, str | None]:
    """The δ* set on the base model, kept in (and reused from) the setup's workdir like every igd attack set."""
    atk = MaxLossPGD(setup.target.model, eps=setup.eps, seed=setup.seed, device=setup.target.device,
                     num_classes=setup.target.loaded.num_classes, steps=steps)
    info = atk.describe()
    key = {"model_fingerprint": setup.target.loaded.fingerprint, "attack": info["attack"], "target": "base",
           "eps": round(setup.eps, 10), "norm": "Linf", "budget": info["budget"], "seed": setup.seed,
           "images": setup.data.source_digest(), **setup.target.identity()}  # images by content, as Evaluator's
    key = json.loads(json.dumps(key, sort_keys=True))
    path = None
    positions = torch.arange(len(setup.data), dtype=torch.int64)
    if setup.workdir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(setup.workdir) / f"base-{info['attack']}-{digest}.safetensors"
        if path.exists():
            try:
                if read_metadata(path).get("set_key") == key:
                    part = restrict(load_set(path, setup.data, eps=setup.eps), positions)
                    if part is not None:
                        return part, str(path)
            except IgdError:
                pass  # unreadable or stale: recompute and overwrite
    res = run_attack(atk, setup.data, batch_size=setup.batch_size, positions=positions,
                     description=f"base {info['attack']}", show_progress=setup.show_progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        x, y = gather(setup.data, res.index)
        model = setup.target.model
        worst = [classify(model, p, y, 1, batch_size=setup.batch_size) for p in (x, res.x_adv)]
        meta = set_meta(setup.target.provenance(), info, "base", setup.data,
                        Score.of(final_of_selected(worst)).mean, {"set_key": key, "point": "argmax loss"})
        save_adversarial(path, res, meta)
    return res, (str(path) if path is not None else None)


def run_shift(setup: EvalSetup, importance: torch.Tensor, layer: str, k: int, steps: int = PGD_STEPS
              ) -> tuple[ShiftResult, dict[str, Any]]:
    """δ* = argmax-loss PGD (:class:`MaxLossPGD`, ``steps`` steps, the paper's 50) on the base model over the
    setup's images (the set is kept and reused in its workdir), then :func:`activation_shift`. Returns the metrics
    and the attack's figures on the base model (deterministic: scored once, exact)."""
    adv, src = _maxloss_set(setup, steps)
    x, y = gather(setup.data, adv.index)
    model = setup.target.model
    clean = classify(model, x, y, 1, seed=setup.seed, batch_size=setup.batch_size)
    bits = classify(model, adv.x_adv, y, 1, seed=setup.seed, batch_size=setup.batch_size)
    shift = activation_shift(model, layer, importance, k, x, adv.x_adv, y, batch_size=setup.batch_size)
    return shift, {"attack": MaxLossPGD.name, "point": "argmax loss over the PGD iterates (Eq. 1)", "steps": steps,
                   "eps": setup.eps, "set": src,
                   "clean_accuracy": Score.of(final_rows(clean)).mean,
                   "robust_accuracy": Score.of(final_of_selected([clean, bits])).mean}


def analyze_shift(setup: EvalSetup, ranking: str, path: str, layer: str, importance: torch.Tensor, k: int,
                  out: str | Path, steps: int = PGD_STEPS) -> dict[str, Any]:
    """``igd analyze shift``: :func:`run_shift`, written to ``OUT/shift-<ranking>-<layer>-k<k>.json`` with its
    bar chart beside it (``.png``, Fig. 2C/D); returns the JSON."""
    from ..report import plot_shift

    t0 = time.perf_counter()

    shift, attack = run_shift(setup, importance, layer, k, steps)
    stem = Path(out) / f"shift-{ranking}-{layer.replace('.', '-')}-k{k}"
    result = {"analysis": "shift", "ranking": ranking, "importance": path, "layer": layer, **shift.to_json(),
              "attack": attack, "labels": LABELS, "setup": {**setup.describe(), "budget": {"steps": steps}},
              **setup.target.record()}
    title = (f"{setup.target.loaded.name.split('/')[-1]} · {layer} · top-{k} of {ranking} · PGD-{steps} (max loss), "
             f"ε = {setup.eps:.4g} · {len(setup.data)} images")
    result["plot"] = str(plot_shift(stem.with_suffix(".png"), result, LABELS, title))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["json"] = str(write_json(stem.with_suffix(".json"), result))
    return result
