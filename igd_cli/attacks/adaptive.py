"""An adaptive attack designed against IG-Defense (beyond the paper; METHOD.md "Beyond the paper").

The defended output's input gradient does not see the route that breaks the defence: the pseudo-label
``ŷ = softmax(f(x + v) / τ)`` with τ = 0.01 is saturated, so the gradient follows only the second pass under a
fixed mask. Following Carlini, Tramèr et al. ("On adaptive attacks to adversarial example defenses") and Croce
et al. (ICML 2022):

1. stage 1: APGD-CE then APGD-DLR with EoT on the first pass as deployed, ``x ↦ mean_i f(x + v_i)`` with fresh
   noise ``v`` drawn as the defence draws it (:meth:`IGDefense.sample_noise`) — igd's ``apgd-eot`` run on
   the smoothed base model (flip the first pass, and the mask selects the adversarial class's neurons);
2. stage 2: APGD-CE with EoT on the full two-pass defence from stage 1's point, ``ŷ``'s forward unchanged and its
   backward that of ``softmax(z / T)``, T ≥ 1 (BPDA, Athalye et al. 2018; :meth:`IGDefense.bpda`);
3. per image, of the two points, the one wrong in the most of ``GATE_DRAWS`` fresh classifications of the
   defence (the repeated-draw rule igd scores with; ties: stage 1's point).

Per-image seeds (``image_seed``) for the random starts and noise keyed by the image and the query's ordinal
(:mod:`igd_cli.noise`): an image's point does not depend on its batch. Without smoothing the model is
deterministic and no EoT is used; on a model that is not an IG-Defense (the base model) both stages attack the
model itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import IgdError
from .apgd import APGD, APGDEoT, _keep
from .base import DrawsPick

#: ``--bpda-temperature`` default: the strongest of 1, 2, 5, 10 on held-out images of the smoothed demo defence
#: (test images 200..399; the figures are reported on images 0..199: docs/adaptive.md)
DEFAULT_BPDA_TEMPERATURE = 1.0


class SmoothedFirstPass(nn.Module):
    """The defence's first pass as deployed: ``x ↦ mean_i f(x + v_i)``, ``v`` drawn fresh per query by the
    defence's own noise stream (``f(x)`` itself without smoothing).

    Example::

        logits = SmoothedFirstPass(defense)(x)  # the logits whose softmax(· / τ) is ŷ
    """

    def __init__(self, defense: nn.Module):
        super().__init__()
        self.defense = defense

    @property
    def randomized(self) -> bool:
        return bool(self.defense.randomized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.defense
        if not (d.rs and d.sigma):
            return d.model(x)
        noisy = (x.unsqueeze(0) + d.sample_noise(x)).reshape(d.n_smooth * x.shape[0], *x.shape[1:])
        return d.model(noisy).reshape(d.n_smooth, x.shape[0], -1).mean(dim=0)


def is_defense(model: nn.Module) -> bool:
    """True for a model the adaptive attack can split into its two passes (an :class:`IGDefense`)."""
    return callable(getattr(model, "bpda", None)) and callable(getattr(model, "sample_noise", None))


class Adaptive(APGD):
    """The adaptive attack on IG-Defense (module doc): stage 1 APGD-CE/DLR + EoT on the smoothed first pass,
    stage 2 APGD-CE + EoT with BPDA through ``ŷ`` (temperature ``bpda_temperature``), per image the candidate
    with the lowest mean correctness. The paper's budgets for each APGD: 100 steps, 20 EoT samples.

    Example::

        atk = Adaptive(defense, eps=8 / 255, seed=0, bpda_temperature=5.0)
        x_adv = atk(x, y, index)
    """

    name = "adaptive"
    defaults = {"steps": 100, "restarts": 1, "eot_iter": 20}
    revision = 2  # 1 chose between the stages on 5 of 10 selection draws, and its stage 1 was apgd-eot revision 3
    built_from = (APGDEoT,)  # stage 1: its revision is part of this attack's

    def __init__(self, model: nn.Module, *, bpda_temperature: float | None = None, **kwargs):
        t = DEFAULT_BPDA_TEMPERATURE if bpda_temperature is None else float(bpda_temperature)
        if not t >= 1:
            raise IgdError(f"--bpda-temperature {bpda_temperature}: must be at least 1")
        super().__init__(model, **kwargs)
        self.temperature = t
        self.budget["bpda_temperature"] = t  # part of the set's identity: another T is another attack

    def _budget_of(self) -> dict[str, int]:
        return {k: v for k, v in self.budget.items() if k != "bpda_temperature"}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        defense = self.model
        own = is_defense(defense)
        first = SmoothedFirstPass(defense) if own else defense
        # stage 1: igd's apgd-eot (CE, then DLR; per-image random starts) on the first pass
        stage1 = APGDEoT(first, eps=self.eps, norm=self.norm, seed=self.seed, device=self.device,
                         num_classes=self.num_classes, randomized=self.randomized, **self._budget_of())
        x1 = stage1.perturb(x, y, index)
        # stage 2: APGD-CE with EoT on the whole defence from stage 1's point, BPDA through ŷ
        apgd = self._make("ce")
        apgd.init_hyperparam(x)
        out, fooled = x1.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        best_loss = torch.full((len(x),), -float("inf"), dtype=x.dtype, device=x.device)
        todo = torch.arange(len(x), device=x.device)
        if own:
            with defense.bpda(self.temperature):
                x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x, y, x_init=x1)
        else:
            x_best, acc, loss_best, x_best_adv = apgd.attack_single_run(x, y, x_init=x1)
        _keep(out, fooled, best_loss, todo, x_best, acc, loss_best, x_best_adv)
        return self.select(x, y, [x1, out])  # ties: stage 1's point (the first pass's own attack)

    def select(self, x: torch.Tensor, y: torch.Tensor, points: list[torch.Tensor]) -> torch.Tensor:
        """Per image, the point wrong in the most of ``GATE_DRAWS`` fresh classifications of the attacked model
        (ties: the earliest): the repeated-draw rule igd scores with, on the attack's own noise."""
        pick = DrawsPick(self.model, y, self._draws())
        for p in points:
            pick.offer(p)
        return pick.points
