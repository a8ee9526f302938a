"""APGD attacks on pyautoattack's own machinery (``APGDAttack.attack_single_run``): CE, CW margin, targeted DLR
and AutoAttack's rand version (CE then DLR, with EoT), in the *transfer* form the paper uses (Appendix B.3): for
every image the returned point is a misclassifying iterate if the attack found one, otherwise the iterate with
the highest loss — never the clean image, also where the attack failed.

Why not ``APGDAttack.perturb``: it returns the clean image where the attack fails (``best_loss=False``) or the
highest-loss point even where a misclassifying iterate exists (``best_loss=True``, and then it does not seed
its random start). The restart loop below is ``perturb``'s, with both outcomes kept; the random start is
pyautoattack's formula drawn from a per-image generator, so an image gives the same point as
``APGDAttack(seed=image_seed(seed, index)).perturb`` run on that image alone, whatever batch it is in.
"""

from __future__ import annotations

import math

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from .. import noise
from .base import GATE_DRAWS, Attack, DrawsPick, correct_draws, image_generators


class _APGDMargin(APGDAttack):
    """APGD with the Carlini–Wagner margin loss ``max_{j≠y} z_j − z_y``.

    pyautoattack selects its loss by name from a fixed list ('ce', 'dlr', ...) and calls the bound method
    ``self.dlr_loss`` for 'dlr'; overriding that method gives the CW loss on the unchanged APGD machinery.
    """

    def __init__(self, *args, **kwargs):
        kwargs["loss"] = "dlr"
        super().__init__(*args, **kwargs)

    def dlr_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # noqa: D401 - pyautoattack hook
        x_sorted, ind_sorted = x.sort(dim=1)
        ind = (ind_sorted[:, -1] == y).to(x.dtype)
        u = torch.arange(x.shape[0], device=x.device)
        return -(x[u, y] - x_sorted[:, -2] * ind - x_sorted[:, -1] * (1.0 - ind))


def random_start(apgd: APGDAttack, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """pyautoattack's random start (``attack_single_run``'s first lines) with per-image generators.

    The generators are CPU ones on purpose: an image's start is then the same draw on any device (a CUDA generator
    gives other numbers); it is drawn in float32, as pyautoattack draws it, and moved to the images' device and dtype.
    """
    if apgd.norm == "Linf":
        t = torch.stack([2 * torch.rand(x.shape[1:], generator=g) - 1 for g in gens]).to(x.device, x.dtype)
    else:  # L2
        t = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device, x.dtype)
    return x + apgd.eps * torch.ones_like(x) * apgd.normalize(t)


class APGD(Attack):
    """APGD-CE (transfer form): 100 steps, 1 restart."""

    name = "apgd-ce"
    defaults = {"steps": 100, "restarts": 1}
    norms = ("Linf", "L2")
    loss = "ce"
    revision = 2  # 1: on a randomized model, restarts skipped images one noise draw had called fooled
    #: classifications that decide between restarts and stages on a randomized model
    GATE_DRAWS = GATE_DRAWS

    def _make(self, loss: str, model=None) -> APGDAttack:
        """pyautoattack's APGD with ``loss`` on ``model`` (default: the attacked model)."""
        eot = self.budget.get("eot_iter", 1)
        if not self.randomized:
            # The model is deterministic: the EoT samples are identical, and APGD uses the mean gradient
            # only through its sign (Linf) or direction (L2), so one sample gives the same iterates.
            eot = 1
        cls = _APGDMargin if loss == "cw" else APGDAttack
        kwargs = {} if loss == "cw" else {"loss": loss}
        return cls(self.model if model is None else model, n_iter=self.budget["steps"], norm=self.norm,
                   n_restarts=self.budget["restarts"],
                   eps=self.eps, seed=self.seed, eot_iter=eot, rho=0.75, device=self.device, **kwargs)

    def _start(self, x: torch.Tensor, index: torch.Tensor, loss: str):
        """The APGD object and the per-image state a run keeps: generators, best points, fooled, best loss."""
        apgd = self._make(loss)
        apgd.init_hyperparam(x)
        return (apgd, image_generators(self.seed, index), x.clone(),
                torch.zeros(len(x), dtype=torch.bool, device=x.device),
                torch.full((len(x),), -float("inf"), dtype=x.dtype, device=x.device))

    def _draws(self) -> int:
        """Classifications that decide between restarts (and stages): one for a deterministic model."""
        return self.GATE_DRAWS if self.randomized else 1

    def _stage(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, loss: str) -> torch.Tensor:
        """``perturb``'s restart loop with ``loss``: the transfer-form points.

        Deterministic model: a later restart runs only on the images no earlier one fooled (a misclassification
        is final). Randomized model: "fooled" is one noise draw, so every restart runs on every image and each
        image keeps the restart's point wrong in the most of ``GATE_DRAWS`` fresh classifications.
        """
        apgd, gens, out, fooled, best_loss = self._start(x, index, loss)
        if self.randomized:
            pick = DrawsPick(self.model, y, self._draws())
            for _ in range(self.budget["restarts"]):
                pick.offer(transfer_run(apgd, x, y, gens))
            return pick.points
        for _ in range(self.budget["restarts"]):
            todo = (~fooled).nonzero().flatten()
            if todo.numel() == 0:
                break
            self._run(apgd, x, y, todo, gens, out, fooled, best_loss)
        return out

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self._stage(x, y, index, self.loss)

    def _run(self, apgd: APGDAttack, x, y, todo, gens, out, fooled, best_loss) -> None:
        init = random_start(apgd, x[todo], [gens[i] for i in todo.tolist()])
        with noise.rows(todo):
            x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x[todo], y[todo], x_init=init)
        _keep(out, fooled, best_loss, todo, x_best, acc, loss_best, x_best_adv)


def transfer_run(apgd: APGDAttack, x: torch.Tensor, y: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One ``attack_single_run`` on every image from its next random start: the transfer-form points (the
    misclassifying iterate where the run found one, else the highest-loss iterate)."""
    every = torch.arange(len(x), device=x.device)
    out, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    best_loss = torch.full((len(x),), -math.inf, dtype=x.dtype, device=x.device)
    init = random_start(apgd, x, gens)
    x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x, y, x_init=init)
    _keep(out, fooled, best_loss, every, x_best, acc, loss_best, x_best_adv)
    return out


def _keep(out, fooled, best_loss, todo, x_best, acc, loss_best, x_best_adv) -> None:
    """Misclassifying iterate where the run found one; else the highest-loss iterate seen so far."""
    acc = acc.bool()
    succ = ~acc
    out[todo[succ]] = x_best_adv[succ]
    fooled[todo[succ]] = True
    better = acc & (loss_best > best_loss[todo])
    out[todo[better]] = x_best[better]
    best_loss[todo[better]] = loss_best[better]


class APGDCW(APGD):
    """APGD with the Carlini–Wagner margin loss (transfer form): 100 steps, 1 restart."""

    name = "apgd-cw"
    loss = "cw"


class APGDEoT(APGD):
    """APGD with Expectation over Transformation as AutoAttack's rand version runs it (Croce & Hein's standard
    attack on randomized defences): APGD-CE, then APGD-DLR, each 100 steps with 20 gradient samples per step and the
    image's own seed for both (as AutoAttack seeds both), in transfer form.

    AutoAttack's rand version runs DLR on every image whose CE point the model still classifies correctly; a
    randomized model answers a point near the boundary differently per query, so the CE point is classified
    ``GATE_DRAWS`` times and DLR runs unless it is wrong in all of them (the rule igd's skipping uses). Where both
    stages ran, the point kept is the one wrong in more of ``GATE_DRAWS`` fresh classifications (the repeated-draw
    rule), ties to the higher DLR loss where both are correct, else to CE. With several restarts, every restart
    runs on every image and the same rule chooses between them (:meth:`APGD._stage`). pyautoattack returns the
    clean image where it fails; here an image always keeps a perturbed point.
    """

    name = "apgd-eot"
    defaults = {"steps": 100, "restarts": 1, "eot_iter": 20}
    revision = 4  # 1: APGD-CE with EoT only; 2: DLR gated on a CE iterate misclassified under one noise draw;
    # 3: restarts skipped images one noise draw had called fooled

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = self._stage(x, y, index, "ce")
        if self._classes(x) < 3:  # DLR needs three classes (AutoAttack's check)
            return out
        ce_correct = self._correct_draws(out, y)
        todo = (ce_correct > 0).nonzero().flatten()  # DLR unless the CE point is wrong in every draw
        if todo.numel() == 0:
            return out
        with noise.rows(todo):
            dlr_out = self._stage(x[todo], y[todo], index[todo.cpu()], "dlr")
            dlr_correct = self._correct_draws(dlr_out, y[todo])
            dlr = self._make("dlr").dlr_loss  # pyautoattack's DLR loss
            with torch.no_grad():
                higher = dlr(self.model(dlr_out), y[todo]) > dlr(self.model(out[todo]), y[todo])
        c_ce = ce_correct[todo]
        take = (dlr_correct < c_ce) | ((dlr_correct == c_ce) & (c_ce == self._draws()) & higher)
        out[todo[take]] = dlr_out[take]
        return out

    def _correct_draws(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """In how many of ``_draws()`` classifications each point is classified correctly (fresh noise each)."""
        return correct_draws(self.model, x_adv, y, self._draws())

    def _classes(self, x: torch.Tensor) -> int:
        if self.num_classes is None:  # one query of every image (never of one: its ordinals would move alone)
            with torch.no_grad():
                self.num_classes = int(self.model(x).shape[1])
        return int(self.num_classes)


class APGDTargetedDLR(APGD):
    """Targeted APGD-DLR (transfer form): 100 steps, 3 restarts, the 9 most likely other classes as targets; on a
    randomized model with EoT (20 gradient samples per step).

    Deterministic model: an image leaves once fooled; where every target fails, the point kept is the one with the
    highest targeted-DLR loss over all targets. Randomized model: every target and restart runs on every image,
    and each image keeps the point wrong in the most of ``GATE_DRAWS`` fresh classifications.
    """

    name = "apgd-t-dlr"
    defaults = {"steps": 100, "restarts": 3, "eot_iter": 20}
    revision = 2  # 1: no EoT on a randomized model; targets and restarts skipped images one draw called fooled
    n_target_classes = 9

    def _make(self, loss: str = "dlr-targeted") -> APGDAttack:
        n_classes = self.num_classes or 10
        eot = self.budget["eot_iter"] if self.randomized else 1
        return APGDAttack_targeted(self.model, n_iter=self.budget["steps"], norm=self.norm,
                                   n_restarts=self.budget["restarts"], eps=self.eps, seed=self.seed, eot_iter=eot,
                                   rho=0.75, n_target_classes=max(1, min(self.n_target_classes, n_classes - 1)),
                                   device=self.device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        apgd, gens, out, fooled, best_loss = self._start(x, index, "dlr-targeted")
        targets = range(2, apgd.n_target_classes + 2)
        if self.randomized:
            return every_target(apgd, x, y, gens, DrawsPick(self.model, y, self._draws()))
        # pyautoattack's APGDAttack_targeted.perturb loop: targets = 2nd..(n+1)th most likely clean class.
        for target_class in targets:
            for _ in range(self.budget["restarts"]):
                todo = (~fooled).nonzero().flatten()
                if todo.numel() == 0:
                    return out
                with torch.no_grad(), noise.rows(todo):
                    logits = self.model(x[todo])
                apgd.y_target = logits.sort(dim=1)[1][:, -target_class]
                self._run(apgd, x, y, todo, gens, out, fooled, best_loss)
        return out


def every_target(apgd: APGDAttack_targeted, x: torch.Tensor, y: torch.Tensor, gens: list[torch.Generator],
                 pick: DrawsPick) -> torch.Tensor:
    """A randomized model's targeted APGD: every target (the 2nd..(n+1)th most likely class of the clean image)
    and every restart on every image, each image keeping the point ``pick`` chooses (the repeated-draw rule)."""
    with torch.no_grad():
        order = apgd.model(x).sort(dim=1)[1]  # the clean image's classes, least to most likely
    for target_class in range(2, apgd.n_target_classes + 2):
        apgd.y_target = order[:, -target_class]
        for _ in range(apgd.n_restarts):
            pick.offer(transfer_run(apgd, x, y, gens))
    return pick.points
