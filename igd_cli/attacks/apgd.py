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

import torch

from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from .. import noise
from .base import Attack, image_generators


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

    def _make(self, loss: str) -> APGDAttack:
        eot = self.budget.get("eot_iter", 1)
        if not self.randomized:
            # The model is deterministic: the EoT samples are identical, and APGD uses the mean gradient
            # only through its sign (Linf) or direction (L2), so one sample gives the same iterates.
            eot = 1
        cls = _APGDMargin if loss == "cw" else APGDAttack
        kwargs = {} if loss == "cw" else {"loss": loss}
        return cls(self.model, n_iter=self.budget["steps"], norm=self.norm, n_restarts=self.budget["restarts"],
                   eps=self.eps, seed=self.seed, eot_iter=eot, rho=0.75, device=self.device, **kwargs)

    def _start(self, x: torch.Tensor, index: torch.Tensor, loss: str):
        """The APGD object and the per-image state a run keeps: generators, best points, fooled, best loss."""
        apgd = self._make(loss)
        apgd.init_hyperparam(x)
        return (apgd, image_generators(self.seed, index), x.clone(),
                torch.zeros(len(x), dtype=torch.bool, device=x.device),
                torch.full((len(x),), -float("inf"), dtype=x.dtype, device=x.device))

    def _stage(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, loss: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``perturb``'s restart loop with ``loss``: the transfer-form points and which images they fool."""
        apgd, gens, out, fooled, best_loss = self._start(x, index, loss)
        for _ in range(self.budget["restarts"]):
            todo = (~fooled).nonzero().flatten()
            if todo.numel() == 0:
                break
            self._run(apgd, x, y, todo, gens, out, fooled, best_loss)
        return out, fooled

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self._stage(x, y, index, self.loss)[0]

    def _run(self, apgd: APGDAttack, x, y, todo, gens, out, fooled, best_loss) -> None:
        init = random_start(apgd, x[todo], [gens[i] for i in todo.tolist()])
        with noise.rows(todo):
            x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x[todo], y[todo], x_init=init)
        _keep(out, fooled, best_loss, todo, x_best, acc, loss_best, x_best_adv)


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
    rule), ties to the higher DLR loss where both are correct, else to CE. pyautoattack returns the clean image
    where it fails; here an image always keeps a perturbed point.
    """

    name = "apgd-eot"
    defaults = {"steps": 100, "restarts": 1, "eot_iter": 20}
    revision = 3  # 1: APGD-CE with EoT only; 2: DLR gated on a CE iterate misclassified under one noise draw
    #: classifications of a point that decide the gate and the choice between the stages (1 when deterministic)
    GATE_DRAWS = 5

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out, _ = self._stage(x, y, index, "ce")
        if self._classes(x) < 3:  # DLR needs three classes (AutoAttack's check)
            return out
        ce_correct = self._correct_draws(out, y)
        todo = (ce_correct > 0).nonzero().flatten()  # DLR unless the CE point is wrong in every draw
        if todo.numel() == 0:
            return out
        with noise.rows(todo):
            dlr_out, _ = self._stage(x[todo], y[todo], index[todo.cpu()], "dlr")
            dlr_correct = self._correct_draws(dlr_out, y[todo])
            dlr = self._make("dlr").dlr_loss  # pyautoattack's DLR loss
            with torch.no_grad():
                higher = dlr(self.model(dlr_out), y[todo]) > dlr(self.model(out[todo]), y[todo])
        c_ce = ce_correct[todo]
        take = (dlr_correct < c_ce) | ((dlr_correct == c_ce) & (c_ce == self._draws()) & higher)
        out[todo[take]] = dlr_out[take]
        return out

    def _draws(self) -> int:
        return self.GATE_DRAWS if self.randomized else 1

    @torch.no_grad()
    def _correct_draws(self, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """In how many of ``_draws()`` classifications each point is classified correctly (fresh noise each)."""
        return sum((self.model(x_adv).argmax(1) == y).long() for _ in range(self._draws()))

    def _classes(self, x: torch.Tensor) -> int:
        if self.num_classes is None:  # one query of every image (never of one: its ordinals would move alone)
            with torch.no_grad():
                self.num_classes = int(self.model(x).shape[1])
        return int(self.num_classes)


class APGDTargetedDLR(APGD):
    """Targeted APGD-DLR (transfer form): 100 steps, 3 restarts, the 9 most likely other classes as targets.

    Where every target fails, the point kept is the one with the highest targeted-DLR loss over all targets.
    """

    name = "apgd-t-dlr"
    defaults = {"steps": 100, "restarts": 3}
    n_target_classes = 9

    def _make(self, loss: str = "dlr-targeted") -> APGDAttack:
        n_classes = self.num_classes or 10
        return APGDAttack_targeted(self.model, n_iter=self.budget["steps"], norm=self.norm,
                                   n_restarts=self.budget["restarts"], eps=self.eps, seed=self.seed, eot_iter=1,
                                   rho=0.75, n_target_classes=max(1, min(self.n_target_classes, n_classes - 1)),
                                   device=self.device)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        apgd, gens, out, fooled, best_loss = self._start(x, index, "dlr-targeted")
        # pyautoattack's APGDAttack_targeted.perturb loop: targets = 2nd..(n+1)th most likely clean class.
        for target_class in range(2, apgd.n_target_classes + 2):
            for _ in range(self.budget["restarts"]):
                todo = (~fooled).nonzero().flatten()
                if todo.numel() == 0:
                    return out
                with torch.no_grad(), noise.rows(todo):
                    logits = self.model(x[todo])
                apgd.y_target = logits.sort(dim=1)[1][:, -target_class]
                self._run(apgd, x, y, todo, gens, out, fooled, best_loss)
        return out
