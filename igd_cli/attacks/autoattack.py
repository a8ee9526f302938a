"""AutoAttack (standard and rand versions), Square and targeted FAB, used from pyautoattack unchanged.

Like pyautoattack, these return the clean image where they fail and seed once per call (per batch). The
budget overrides exist for small machines: ``steps`` sets the iterations of every APGD/FAB inside AutoAttack
(pyautoattack derives APGD's step-size checkpoints from ``n_iter`` at construction, so they are recomputed),
``queries`` Square's query budget, ``eot_iter`` the EoT samples of the rand version.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack

from .base import Attack


def set_apgd_iters(apgd: APGDAttack, n_iter: int) -> None:
    """Change an APGDAttack's iterations after construction, with the checkpoints its __init__ derives."""
    apgd.n_iter = n_iter
    apgd.n_iter_orig = n_iter
    apgd.n_iter_2 = max(int(0.22 * n_iter), 1)
    apgd.n_iter_min = max(int(0.06 * n_iter), 1)
    apgd.size_decr = max(int(0.03 * n_iter), 1)


class AutoAttackStandard(Attack):
    """AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; RobustBench's settings)."""

    name = "aa"
    version = "standard"
    defaults = {"steps": 100, "queries": 5000}
    norms = ("Linf", "L2")

    def build(self) -> AutoAttack:
        aa = AutoAttack(self.model, norm=self.norm, eps=self.eps, seed=self.seed, version=self.version,
                        device=self.device)
        aa.verbose = False
        if self.num_classes is not None and self.num_classes - 1 < aa.apgd_targeted.n_target_classes:
            aa.apgd_targeted.n_target_classes = self.num_classes - 1
            aa.fab.n_target_classes = self.num_classes - 1
        steps = self.budget.get("steps", 100)
        if steps != 100:
            set_apgd_iters(aa.apgd, steps)
            set_apgd_iters(aa.apgd_targeted, steps)
            aa.fab.n_iter = steps
        if "queries" in self.budget:
            aa.square.n_queries = self.budget["queries"]
        if "eot_iter" in self.budget:
            aa.apgd.eot_iter = self.budget["eot_iter"]
        return aa

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        aa = self.build()
        with contextlib.redirect_stdout(sys.stderr):  # stdout belongs to --json
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv


class AutoAttackRand(AutoAttackStandard):
    """AutoAttack, rand version for randomized defences (APGD-CE and APGD-DLR with 20 EoT samples)."""

    name = "aa-rand"
    version = "rand"
    defaults = {"steps": 100, "eot_iter": 20}


class Square(Attack):
    """Square attack (score-based black box), 5000 queries, AutoAttack's settings (p_init 0.8)."""

    name = "square"
    defaults = {"queries": 5000, "restarts": 1}
    norms = ("Linf", "L2")

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sq = SquareAttack(self.model, p_init=0.8, n_queries=self.budget["queries"], eps=self.eps, norm=self.norm,
                          n_restarts=self.budget["restarts"], seed=self.seed, verbose=False, device=self.device,
                          resc_schedule=False)
        with contextlib.redirect_stdout(sys.stderr):
            return sq.perturb(x, y)


class FABTargeted(Attack):
    """Targeted FAB (FAB-T) as AutoAttack's standard version runs it: 100 steps, 1 restart, 9 target classes
    (``igd audit``'s stronger AutoAttack gives it 10 restarts, as the paper's Table 9 does)."""

    name = "fab-t"
    defaults = {"steps": 100, "restarts": 1}
    norms = ("Linf", "L2")

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        classes = self.num_classes if self.num_classes is not None else 10
        fab = FABAttack_PT(self.model, n_restarts=self.budget["restarts"], n_iter=self.budget["steps"],
                           eps=self.eps, seed=self.seed, norm=self.norm, verbose=False, device=self.device,
                           targeted=True, n_target_classes=max(1, min(9, classes - 1)))
        with contextlib.redirect_stdout(sys.stderr):
            return fab.perturb(x, y)
