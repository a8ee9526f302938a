"""The adaptive attack: designed against IG-Defense (beyond the paper; METHOD.md "Beyond the paper"), and the
generic adaptive column of any defence through the contract's optional capabilities (:mod:`igd_cli.contract`).

The defended output's input gradient does not see the route that breaks IG-Defense: the pseudo-label
``ŷ = softmax(f(x + v) / τ)`` with τ = 0.01 is saturated, so the gradient follows only the second pass under a
fixed mask. Following Carlini, Tramèr et al. ("On adaptive attacks to adversarial example defenses") and Croce
et al. (ICML 2022), for a defence with capabilities ``first_pass`` and ``surrogate``:

1. stage 1: APGD-CE then APGD-DLR with EoT on the defence's ``first_pass(x)`` (IG-Defense: the first pass as
   deployed, ``x ↦ mean_i f(x + v_i)`` with fresh noise drawn as the defence draws it) — igd's ``apgd-eot`` run
   on it (flip IG-Defense's first pass, and the mask selects the adversarial class's neurons); without
   ``first_pass``, on the model of stage 2;
2. stage 2: APGD-CE with EoT on the defence's ``surrogate`` (BPDA, Athalye et al. 2018; IG-Defense: the whole
   two-pass defence, ``ŷ``'s forward unchanged and its backward that of ``softmax(z / T)``, T ≥ 1,
   :meth:`IGDefense.bpda`) from stage 1's point; without ``surrogate``, on the defence itself;
3. for a user's defence (``--defense``, :class:`igd_cli.contract.UserDefense`) and ℓ∞, igd's PGD with EoT on the
   model of stage 2 as a third candidate: at few steps on a randomized transform, APGD's step-size rule falls
   short of plain PGD + EoT (docs/own-defense.md); IG-Defense's column is the two stages;
4. per image, of the points, the one wrong in the most of ``GATE_DRAWS`` fresh classifications of the
   defence (the repeated-draw rule igd scores with; ties: stage 1's point).

Per-image seeds (``image_seed``) for the random starts and noise keyed by the image and the query's ordinal
(:mod:`igd_cli.noise`): an image's point does not depend on its batch. A deterministic defence gets no EoT; a
model with neither capability (the base model) is attacked itself by both stages.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import contract
from ..errors import IgdError
from .apgd import APGD, APGDEoT, _keep
from .base import DrawsPick
from .pgd import PGD

#: ``--bpda-temperature`` default: the strongest of 1, 2, 5, 10 on held-out images of the smoothed demo defence
#: (test images 200..399; the figures are reported on images 0..199: docs/adaptive.md)
DEFAULT_BPDA_TEMPERATURE = 1.0


class Adaptive(APGD):
    """The adaptive attack (module doc): stage 1 APGD-CE/DLR + EoT on the defence's first pass, stage 2 APGD-CE +
    EoT on its surrogate (IG-Defense: BPDA through ``ŷ`` at temperature ``bpda_temperature``), per image the
    candidate with the lowest mean correctness. The paper's budgets for each APGD: 100 steps, 20 EoT samples.

    Example::

        atk = Adaptive(defense, eps=8 / 255, seed=0, bpda_temperature=5.0)
        x_adv = atk(x, y, index)
    """

    name = "adaptive"
    defaults = {"steps": 100, "restarts": 1, "eot_iter": 20}
    revision = 2  # 1 chose between the stages on 5 of 10 selection draws, and its stage 1 was apgd-eot revision 3
    built_from = (APGDEoT, PGD)  # stage 1, and stage 3 of a user's defence: their revisions are part of this one's

    def __init__(self, model: nn.Module, *, bpda_temperature: float | None = None, **kwargs):
        t = DEFAULT_BPDA_TEMPERATURE if bpda_temperature is None else float(bpda_temperature)
        if not t >= 1:
            raise IgdError(f"--bpda-temperature {bpda_temperature}: must be at least 1")
        if bpda_temperature is not None and contract.surrogate(model) is not None and \
                not contract.takes_temperature(model):
            raise IgdError("--bpda-temperature: this defence's surrogate(x) takes no temperature")
        super().__init__(model, **kwargs)
        self.temperature = t
        self.budget["bpda_temperature"] = t  # part of the set's identity: another T is another attack

    def _budget_of(self) -> dict[str, int]:
        return {k: v for k, v in self.budget.items() if k != "bpda_temperature"}

    def stages(self) -> tuple[nn.Module, nn.Module]:
        """The models of stage 1 (the first pass, else stage 2's) and stage 2 (the surrogate, else the defence)."""
        attacked = contract.surrogate(self.model, self.temperature) or self.model
        return contract.first_pass(self.model) or attacked, attacked

    def followed(self) -> list[tuple[nn.Module, str]]:
        first, attacked = self.stages()
        what = "defence's surrogate" if attacked is not self.model else "attacked model"
        return [(first, "defence's first pass" if first is not attacked else what), (attacked, what)]

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        first, attacked = self.stages()
        # stage 1: igd's apgd-eot (CE, then DLR; per-image random starts) on the first pass
        stage1 = APGDEoT(first, eps=self.eps, norm=self.norm, seed=self.seed, device=self.device,
                         num_classes=self.num_classes, randomized=self.randomized, **self._budget_of())
        x1 = stage1.perturb(x, y, index)
        # stage 2: APGD-CE with EoT on the surrogate from stage 1's point
        apgd = self._make("ce", attacked)
        apgd.init_hyperparam(x)
        out, fooled = x1.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        best_loss = torch.full((len(x),), -float("inf"), dtype=x.dtype, device=x.device)
        todo = torch.arange(len(x), device=x.device)
        x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x, y, x_init=x1)
        _keep(out, fooled, best_loss, todo, x_best, acc, loss_best, x_best_adv)
        points = [x1, out]
        if isinstance(self.model, contract.UserDefense) and self.norm == "Linf":
            # stage 3, a user's defence only: igd's PGD with EoT on the surrogate (fixed steps of 2.5·ε/steps).
            # At few steps on a randomized transform APGD's step-size rule, driven by a noisy loss, falls short of
            # plain PGD + EoT (docs/own-defense.md); IG-Defense's column is the two stages above
            b = self.budget
            pgd = PGD(attacked, eps=self.eps, norm=self.norm, seed=self.seed, device=self.device,
                      num_classes=self.num_classes, randomized=self.randomized, strict=False, steps=b["steps"],
                      restarts=1, eot_iter=b.get("eot_iter", 1))
            points.append(pgd.perturb(x, y, index))
        return self.select(x, y, points)  # ties: stage 1's point (the first pass's own attack)

    def select(self, x: torch.Tensor, y: torch.Tensor, points: list[torch.Tensor]) -> torch.Tensor:
        """Per image, the point wrong in the most of ``GATE_DRAWS`` fresh classifications of the attacked model
        (ties: the earliest): the repeated-draw rule igd scores with, on the attack's own noise."""
        pick = DrawsPick(self.model, y, self._draws())
        for p in points:
            pick.offer(p)
        return pick.points
