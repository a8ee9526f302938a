"""Checks on the gradients themselves: AutoAttack's own flags (check 1, pyautoattack's ``checks`` module) and the
loss surface around each image (check 6, the paper's Fig. 8).

Example::

    r = autoattack_flags(audit)            # CheckResult: which of pyautoattack's warnings fired
    s = loss_surfaces(model, x, y, eps=0.2, grid=11, draws=1)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from pyautoattack import checks

from .. import contract, noise
from ..attacks.base import image_generators, is_randomized
from .context import Audit
from .result import CheckResult
from .thresholds import THRESHOLDS

#: the attacks standard AutoAttack runs (what pyautoattack's class-count check is given)
AA_ATTACKS = ["apgd-ce", "apgd-t", "fab-t", "square"]


class _Log:
    """A logger for pyautoattack's checks: collects the warnings instead of printing them."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def warning(self, msg: str) -> None:
        self.messages.append(str(msg))


def input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """The cross-entropy gradient w.r.t. the input (summed over images), averaged over ``draws`` queries (EoT)."""
    g = torch.zeros_like(x)
    for _ in range(draws):
        xr = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xr), y, reduction="sum")
            grad, = torch.autograd.grad(loss, [xr])
        g += grad.detach()
    return g / draws


def autoattack_flags(audit: Audit) -> CheckResult:
    """Check 1: pyautoattack's checks (randomness, probabilities as output, zero gradients, dynamic forward,
    class count) on the first batch of the audited model, as ``AutoAttack.run_standard_evaluation`` runs them
    (zero gradients: at the clean images, where APGD's first step takes its gradient)."""
    model = audit.audited
    x, y = audit.x[: audit.batch_size].to(audit.target.device), audit.y[: audit.batch_size].to(audit.target.device)
    logs = {k: _Log() for k in ("randomized", "probabilities", "zero_gradients", "dynamic", "n_classes")}
    keys = audit.keys[: audit.batch_size]
    with warnings.catch_warnings(), noise.images(keys, noise.stream(audit.seed, "audit:flags")):
        warnings.simplefilter("ignore")
        checks.check_randomized(model, x, y, n=5, logger=logs["randomized"])
        with torch.no_grad():
            out = torch.stack([model(x) for _ in range(2)])
        n_cls = checks.check_range_output(model, x, logger=logs["probabilities"])
        no_grad = not contract.has_gradient(model, x)
        grad = torch.zeros_like(x) if no_grad else input_gradient(model, x, y)  # no gradient: zero on every image
        checks.check_zero_gradients(grad, logger=logs["zero_gradients"])
        for k in checks.funcs:  # pyautoattack counts autograd calls in a module-level dict it never resets
            checks.funcs[k] = 0
        checks.check_dynamic(model, x, False, logger=logs["dynamic"])
        targets = max(1, min(9, n_cls - 1))
        checks.check_n_classes(n_cls, AA_ATTACKS, targets, targets, logger=logs["n_classes"])
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    warned = [k for k, log in logs.items() if log.messages]
    declared = is_randomized(model)
    random = declared or "randomized" in warned
    eot = eot_samples(audit)
    # a random output is a problem only for an evaluation that ignores it: one draw per point (no repeated
    # draws) or white-box attacks without EoT; igd's protocol (repeated draws, APGD+EoT) is AutoAttack's own
    # prescription for a randomized defence. A model that is random without declaring it (no ``randomized``
    # attribute) is scored once and attacked without EoT: unguarded whatever the protocol
    unguarded = random and (not declared or audit.protocol != "draws" or eot < 2)
    fired = [k for k in warned if k != "randomized"] + (["randomized"] if unguarded else [])
    figures = {"flags": fired, "warnings": warned,
               "messages": {k: log.messages for k, log in logs.items() if log.messages},
               "images_checked": len(x), "zero_gradient_images": zero, "no_gradient": no_grad,
               "output_changes_between_calls": bool(not torch.equal(out[0], out[1])), "n_classes": int(n_cls),
               "declares_fresh_noise": declared, "randomized": random, "protocol": audit.protocol,
               "eot_samples": eot if random else None}
    text = ("AutoAttack warns: " + ", ".join(warned)) if warned else "no AutoAttack warning"
    if random and "randomized" not in warned:
        text += " (the model declares fresh noise per query)"
    if random:
        text += (f"; scored by {audit.protocol}" + ("" if audit.protocol != "draws" else f" ({audit.draws} + "
                                                     f"{audit.draws})") + f", APGD with {eot} EoT samples")
    text += f"; zero gradient on {zero}/{len(x)} images" + (" (the output has no gradient at all)" if no_grad else "")
    meaning = {
        "randomized": "the output is random but the evaluation scores one draw per point or attacks without EoT: "
                      "a lucky draw decides near the boundary; use --protocol draws and EoT (AutoAttack's rand "
                      "version)",
        "probabilities": "the model outputs probabilities: CE/DLR on them saturate, give logits",
        "zero_gradients": "some images have an exactly zero input gradient: gradient attacks stall there",
        "dynamic": "the forward pass itself computes gradients: a dynamic defence AutoAttack may not break",
        "n_classes": "too few classes for AutoAttack's targeted attacks",
    }
    ok = ("none of AutoAttack's warnings fired" if not warned else
          "the model is random, and every figure is a repeated-draw score of EoT attacks, as AutoAttack prescribes")
    return CheckResult(1, "AutoAttack flags", "flag" if fired else "ok", figures, text,
                       "; ".join(meaning[k] for k in fired) or ok)


def eot_samples(audit: Audit) -> int:
    """The EoT samples of the audit's white-box attack on a randomized model (the preset's, else APGD+EoT's
    default)."""
    from ..attacks import ATTACKS

    given = audit.budgets().eot_iter
    return int(given if given is not None else ATTACKS["apgd-eot"].defaults["eot_iter"])


# --- check 6: loss surface --------------------------------------------------------------------------------

@dataclass
class Surface:
    """Cross-entropy on ``x + α·sign(g) + β·g⊥`` (projected onto the ε-ball and [0, 1]) for α, β on a grid over
    [−ε, ε] (``losses[i, a, b]``; α along rows), with the misclassified points, per image."""

    alphas: torch.Tensor  # (G,)
    losses: torch.Tensor  # (n, G, G)
    wrong: torch.Tensor  # (n, G, G) bool: misclassified in the mean over draws

    def verdicts(self) -> dict[str, Any]:
        """Per image: the loss at x, the best along the gradient direction (β = 0, α ≥ 0), the best anywhere on
        the grid, and whether the grid beats the gradient line by more than the surface margin."""
        g = len(self.alphas)
        mid = g // 2
        l0 = self.losses[:, mid, mid]
        line = self.losses[:, mid:, mid].amax(1)
        grid = self.losses.flatten(1).amax(1)
        allow = THRESHOLDS["surface_rel"] * (line - l0).clamp_min(0) + THRESHOLDS["surface_margin"]
        flagged = grid - line > allow
        line_wrong = self.wrong[:, mid:, mid].any(1)
        grid_wrong = self.wrong.flatten(1).any(1)
        return {"loss_at_x": l0.tolist(), "gradient_line_max": line.tolist(), "grid_max": grid.tolist(),
                "flagged": flagged.tolist(), "share_flagged": float(flagged.float().mean()),
                "misclassified_on_line": line_wrong.tolist(), "misclassified_on_grid": grid_wrong.tolist()}


def orthogonal_direction(g: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """Per image a random sign vector made orthogonal (ℓ2) to the gradient ``g`` and scaled to ℓ∞ norm 1: in a
    locally linear loss it changes nothing, so only curvature (or masking) makes the grid beat the gradient."""
    r = torch.stack([torch.randint(0, 2, g.shape[1:], generator=gen).float() * 2 - 1 for gen in gens]).to(g)
    gf, rf = g.flatten(1), r.flatten(1)
    nn2 = (gf * gf).sum(1, keepdim=True)
    rf = torch.where(nn2 > 0, rf - (rf * gf).sum(1, keepdim=True) / nn2.clamp_min(1e-30) * gf, rf)
    rf = rf / rf.abs().amax(1, keepdim=True).clamp_min(1e-12)
    return rf.view_as(g)


@torch.no_grad()
def loss_surfaces(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, grid: int, draws: int = 1,
                  seed: int = 0, batch_size: int = 256, index: torch.Tensor | None = None) -> Surface:
    """The loss surface of ``model`` around each image (Fig. 8): a ``grid``×``grid`` lattice over [−ε, ε]² in the
    plane of ``sign(g)`` (``g`` the CE gradient, averaged over ``draws`` queries for a randomized model) and a
    random direction orthogonal to ``g``; the loss of a randomized model is averaged over ``draws`` queries."""
    if grid < 3 or grid % 2 == 0:
        raise ValueError("the surface grid must be odd (α = β = 0 on it) and at least 3")
    draws = draws if is_randomized(model) else 1
    device = next((p.device for p in model.parameters()), x.device)
    x, y = x.to(device), y.to(device)
    idx = index if index is not None else torch.arange(len(x))
    keys, stream = noise.image_keys(idx, x), noise.stream(seed, "audit:surface")
    with noise.images(keys, stream):
        g = input_gradient(model, x, y, draws)
    s = g.sign()
    r = orthogonal_direction(g, image_generators(seed, idx))
    alphas = torch.linspace(-eps, eps, grid)
    a, b = torch.meshgrid(alphas, alphas, indexing="ij")
    a, b = a.flatten().to(device, x.dtype), b.flatten().to(device, x.dtype)
    shape = (1,) * (x.dim() - 1)
    pts = []
    for i in range(len(x)):
        d = a.view(-1, *shape) * s[i] + b.view(-1, *shape) * r[i]
        pts.append((x[i] + d.clamp(-eps, eps)).clamp(0, 1))
    pts_t = torch.cat(pts)  # (n·G², ...)
    yy = y.repeat_interleave(grid * grid)
    loss = torch.zeros(len(pts_t), dtype=x.dtype, device=device)
    prob = None
    owner = torch.arange(len(x), device=device).repeat_interleave(grid * grid)  # the image of every grid point
    with noise.images(keys, noise.stream(stream, "grid")):
        for _ in range(draws):
            logits = torch.cat([_owned(model, pts_t[j:j + batch_size], owner[j:j + batch_size])
                                for j in range(0, len(pts_t), batch_size)])
            loss += F.cross_entropy(logits, yy, reduction="none")
            p = F.softmax(logits, 1)
            prob = p if prob is None else prob + p
    loss /= draws
    wrong = prob.argmax(1) != yy
    n = len(x)
    return Surface(alphas, loss.view(n, grid, grid).cpu(), wrong.view(n, grid, grid).cpu())


def _owned(model: nn.Module, points: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """``model(points)``, each point a query of the image ``owner`` names (several points of one image: one query
    each, in order)."""
    with noise.rows(owner):
        return model(points)


def surface_check(audit: Audit) -> tuple[CheckResult, dict[str, Surface]]:
    """Check 6: the audited model's loss surface (and the base model's, for the plot) on the first few images;
    flag when brute force on the grid finds what the gradient direction does not."""
    n = min(int(audit.preset["surface_images"]), len(audit.x))
    x, y = audit.x[:n], audit.y[:n]
    if not contract.has_gradient(audit.audited, x.to(audit.target.device)):
        return CheckResult(6, "loss surface (Fig. 8)", "flag", {"no_gradient": True, "images": n},
                           "the audited model's output has no gradient: there is no gradient direction to follow",
                           "the forward loses its gradient (a non-differentiable step): every gradient attack is "
                           "blind here, so only black-box, transferred and BPDA attacks (a surrogate) measure it"), {}
    kw = {"eps": audit.eps, "grid": int(audit.preset["surface_grid"]), "draws": int(audit.preset["surface_draws"]),
          "seed": audit.seed, "batch_size": audit.batch_size, "index": audit.positions[:n]}
    surfaces = {"audited": loss_surfaces(audit.audited, x, y, **kw)}
    if audit.defense is not None:
        surfaces["base"] = loss_surfaces(audit.target.model, x, y, **kw)
    figures = {name: s.verdicts() for name, s in surfaces.items()}
    v = figures["audited"]
    k = sum(v["flagged"])
    bad = v["share_flagged"] > THRESHOLDS["surface_share"]
    gap = max(gm - lm for gm, lm in zip(v["grid_max"], v["gradient_line_max"]))
    text = (f"grid beats the gradient direction on {k}/{n} images (largest excess {gap:.3f} nats; "
            f"{kw['grid']}×{kw['grid']} grid" + (f", loss mean of {kw['draws']} draws" if audit.randomized else "")
            + ")")
    meaning = ("brute force on the ε-ball finds higher loss than the gradient direction: gradients point the "
               "wrong way (masked or shattered); gradient attacks underestimate the attacker") if bad else \
        "the gradient direction finds the loss the grid finds: no sign of masked gradients"
    figures.update({"grid": kw["grid"], "draws": kw["draws"] if audit.randomized else 1, "images": n})
    return CheckResult(6, "loss surface (Fig. 8)", "flag" if bad else "ok", figures, text, meaning), surfaces
