"""AutoAttack (standard and rand versions), Square and targeted FAB, with per-image randomness.

pyautoattack's ``AutoAttack.run_standard_evaluation`` seeds the global generator once per call and every random
start, Square window and FAB restart of a batch is drawn from it, so an image's point depends on the batch it is
attacked in (its size, a ``--shard`` split, the survivors IW-WC skips to). Here AutoAttack is composed from the
same pyautoattack pieces run the way ``run_standard_evaluation`` runs them, with every random draw of an image taken
from its own generator (:func:`~igd_cli.attacks.base.image_seed`): an image gets exactly the point that
``AutoAttack(seed=image_seed(seed, index)).run_standard_evaluation`` gives it when attacked alone (tested image by
image), whatever batch, shard or order it is in.

- APGD-CE / APGD-DLR / APGD-T: pyautoattack's ``attack_single_run`` with the start drawn from the image's generator
  (``x_init``), inside ``perturb``'s own loops (:mod:`igd_cli.attacks.apgd`);
- FAB-T: pyautoattack's ``FABAttack_PT.attack_single_run`` inside ``perturb``'s own loop over target classes and
  restarts (:func:`fab_targeted`); with one restart (AutoAttack's) it draws nothing and runs batched; with more
  (the audit's stronger AutoAttack) every image runs alone under its own seed;
- Square: :class:`~igd_cli.attacks.square.PerImageSquare` (pyautoattack's with per-image windows).

AutoAttack's rule between stages is kept on a deterministic model: an image leaves after the first stage whose
returned point the model misclassifies in one query (``run_standard_evaluation``'s check), and it keeps the clean
image where every stage fails. On a randomized model one query is a coin toss near the boundary, so no decision
rests on one draw: an image leaves once a stage's point is wrong in every one of ``GATE_DRAWS`` fresh
classifications, every restart and target of a stage runs on every image, and each image keeps the point wrong
in the most draws (the repeated-draw rule igd scores with). Budget overrides exist for small machines: ``steps`` sets every APGD/FAB's iterations (with the
checkpoints APGD derives from ``n_iter``), ``queries`` Square's budget, ``eot_iter`` the rand version's EoT
samples.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT

from .. import noise
from .apgd import every_target, random_start, transfer_run
from .base import GATE_DRAWS, Attack, DrawsPick, correct_draws, image_generators, image_seed, project
from .square import PerImageSquare

#: the stages of each version, in AutoAttack's order (pyautoattack's ``_set_version``)
VERSIONS: dict[str, tuple[str, ...]] = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
                                        "rand": ("apgd-ce", "apgd-dlr")}
#: AutoAttack's targeted attacks use the 9 most likely other classes
N_TARGET_CLASSES = 9


def n_targets(num_classes: int | None) -> int:
    """AutoAttack's target classes: 9, or one fewer than the classes on smaller problems."""
    return max(1, min(N_TARGET_CLASSES, (num_classes or 10) - 1))


def _quiet():
    return contextlib.redirect_stdout(sys.stderr)  # stdout belongs to --json


def apgd_untargeted(apgd: APGDAttack, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, seed: int,
                    draws: int = 1) -> torch.Tensor:
    """``APGDAttack.perturb(x, y)`` (``best_loss=False``: the clean image where it fails) with per-image starts.
    ``draws`` > 1 (a randomized model): every restart on every image, each keeping the restart's point wrong in
    the most of ``draws`` fresh classifications (:class:`~igd_cli.attacks.base.DrawsPick`)."""
    apgd.init_hyperparam(x)
    if draws > 1:
        gens, pick = image_generators(seed, index), DrawsPick(apgd.model, y, draws)
        for _ in range(apgd.n_restarts):
            pick.offer(transfer_run(apgd, x, y, gens))
        return pick.points
    with torch.no_grad():
        acc = apgd.model(x).max(1)[1] == y
    adv = x.clone()
    gens = image_generators(seed, index)
    for _ in range(apgd.n_restarts):
        todo = acc.nonzero().flatten()
        if todo.numel() == 0:
            break
        _run_fooling(apgd, x, y, todo, gens, acc, adv)
    return adv


def _run_fooling(apgd: APGDAttack, x: torch.Tensor, y: torch.Tensor, todo: torch.Tensor,
                 gens: list[torch.Generator], acc: torch.Tensor, adv: torch.Tensor) -> None:
    """One ``attack_single_run`` on the images ``todo`` from their own random starts; the ones it fools leave
    ``acc`` and keep their adversarial point in ``adv`` (``perturb``'s bookkeeping)."""
    init = random_start(apgd, x[todo], [gens[i] for i in todo.tolist()])
    with noise.rows(todo):
        _, acc_curr, _, adv_curr = apgd.attack_single_run(x[todo], y[todo], x_init=init)
    won = (acc_curr == 0).nonzero().flatten()
    acc[todo[won]] = False
    adv[todo[won]] = adv_curr[won].clone()


def apgd_targeted(apgd: APGDAttack_targeted, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                  seed: int, draws: int = 1) -> torch.Tensor:
    """``APGDAttack_targeted.perturb(x, y)`` with per-image starts: targets the 2nd .. (n+1)th most likely classes.
    ``draws`` > 1: every target and restart on every image, chosen as in :func:`apgd_untargeted`."""
    apgd.init_hyperparam(x)
    if draws > 1:
        return every_target(apgd, x, y, image_generators(seed, index), DrawsPick(apgd.model, y, draws))
    with torch.no_grad():
        acc = apgd.model(x).max(1)[1] == y
    adv = x.clone()
    gens = image_generators(seed, index)
    for target_class in range(2, apgd.n_target_classes + 2):
        for _ in range(apgd.n_restarts):
            todo = acc.nonzero().flatten()
            if todo.numel() == 0:
                return adv
            with torch.no_grad(), noise.rows(todo):
                apgd.y_target = apgd.model(x[todo]).sort(dim=1)[1][:, -target_class]
            _run_fooling(apgd, x, y, todo, gens, acc, adv)
    return adv


class _FAB(FABAttack_PT):
    """pyautoattack's FAB whose queries declare their images (:func:`igd_cli.noise.rows`).

    ``attack_single_run`` queries every row of its batch first (the predicted labels, then the target classes) and
    from then on only the rows it found correctly classified in that first query; the queries of that subset are
    declared as such, so a randomized model draws each image's own noise (pyautoattack's code is unchanged).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._model, self.predict = self.predict, self._query
        self._n: int | None = None  # rows of the current attack_single_run's batch
        self._y: torch.Tensor | None = None
        self._kept: torch.Tensor | None = None  # the rows it attacks, known after its first query

    def _query(self, z: torch.Tensor) -> torch.Tensor:
        if self._kept is not None and len(z) != self._n:
            with noise.rows(self._kept):
                return self._model(z)
        return self._model(z)

    def _get_predicted_label(self, x: torch.Tensor) -> torch.Tensor:
        out = super()._get_predicted_label(x)
        if self._kept is None and self._n is not None and len(x) == self._n:  # attack_single_run's first query
            self._kept = (out == self._y).nonzero().flatten()
        return out

    def attack_single_run(self, x, y=None, use_rand_start=False, is_targeted=False):
        self._n, self._y, self._kept = len(x), y.to(x.device), None
        try:
            return super().attack_single_run(x, y, use_rand_start=use_rand_start, is_targeted=is_targeted)
        finally:
            self._n = self._y = self._kept = None


def _fab_loop(fab: _FAB, x: torch.Tensor, y: torch.Tensor, draws: int = 1) -> torch.Tensor:
    """``FABAttack_PT.perturb``'s targeted loop (targets 2..n+1, restarts, an image leaves once fooled within ε),
    with the subsets it attacks declared as the images they are. ``draws`` > 1 (a randomized model): every target
    and restart on every image, each keeping the point (projected onto the ε-ball) wrong in the most of ``draws``
    fresh classifications."""
    adv = x.clone()
    pick = DrawsPick(fab.predict, y, draws) if draws > 1 else None
    with torch.no_grad():
        acc = fab.predict(x).max(1)[1] == y if pick is None else torch.ones_like(y, dtype=torch.bool)
        for target_class in range(2, fab.n_target_classes + 2):
            fab.target_class = target_class
            for counter in range(fab.n_restarts):
                todo = acc.nonzero().flatten()
                if todo.numel() == 0:
                    return adv
                x_to, y_to = x[todo].clone(), y[todo].clone()
                with noise.rows(todo):
                    adv_curr = fab.attack_single_run(x_to, y_to, use_rand_start=counter > 0, is_targeted=True)
                    if pick is not None:
                        pick.offer(project(adv_curr, x_to, fab.eps, fab.norm))
                        continue
                    acc_curr = fab.predict(adv_curr).max(1)[1] == y_to
                acc_curr = acc_curr | (_dist(x_to - adv_curr, fab.norm) > fab.eps)
                won = (~acc_curr).nonzero().flatten()
                acc[todo[won]] = False
                adv[todo[won]] = adv_curr[won].clone()
    return adv if pick is None else pick.points


def _dist(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm of ``delta``, as FAB's ``perturb`` measures it."""
    flat = delta.reshape(len(delta), -1)
    if norm == "Linf":
        return flat.abs().max(1)[0]
    if norm == "L2":
        return (flat ** 2).sum(-1).sqrt()
    return flat.abs().sum(-1)


def fab_targeted(fab: _FAB, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, seed: int,
                 draws: int = 1) -> torch.Tensor:
    """``FABAttack_PT.perturb`` (targeted), as :func:`_fab_loop` (``draws``: see there). Its random starts (restarts
    after the first) come from the global generator, which ``perturb`` seeds per call: with one restart it draws
    nothing and runs on the batch; with more, every image runs alone with the global generator seeded by its own
    seed."""
    dtype = x.dtype
    if dtype != torch.float32:
        # pyautoattack's FAB works in float32 (``attack_single_run`` casts the images with ``.float()``): it runs
        # on float32 images, its queries are cast to the images' dtype (a float64 model) and their logits back to
        # float32, and its points are returned in the images' dtype
        model = fab._model
        fab._model = lambda z: model(z.to(dtype)).float()
        x = x.float()
    if fab.n_restarts == 1:
        return _fab_loop(fab, x, y, draws).to(dtype)
    out = []
    for i in range(len(x)):
        s = image_seed(seed, int(index[i]))
        torch.random.manual_seed(s)
        torch.cuda.random.manual_seed(s)
        with noise.rows([i]):
            out.append(_fab_loop(fab, x[i:i + 1], y[i:i + 1], draws))
    return torch.cat(out).to(dtype)


class AutoAttackStandard(Attack):
    """AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square; RobustBench's settings), per-image seeded."""

    name = "aa"
    version = "standard"
    defaults = {"steps": 100, "queries": 5000}
    norms = ("Linf", "L2")
    # 1 was pyautoattack's run_standard_evaluation on each batch (seeded per batch); 2 decided on a randomized
    # model by one noise draw which images a stage broke and which restarts and targets to skip
    revision = 3

    def _draws(self) -> int:
        """Classifications that decide whether a stage broke an image and between stages, restarts and targets:
        one for a deterministic model (AutoAttack's own rule), ``GATE_DRAWS`` for a randomized one."""
        return GATE_DRAWS if self.randomized else 1

    def stages(self) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]:
        """Stage name -> ``fn(x, y, index) -> points`` (clean where the stage fails on a deterministic model),
        AutoAttack's settings."""
        steps = self.budget.get("steps", 100)
        eot = self.budget.get("eot_iter", 1) if self.randomized else 1
        model, dev, eps, norm, seed, draws = self.model, self.device, self.eps, self.norm, self.seed, self._draws()

        def apgd(loss: str) -> Callable:
            def run(x, y, index):
                a = APGDAttack(model, n_restarts=1, n_iter=steps, verbose=False,
                               eps=eps, norm=norm, eot_iter=eot, rho=.75, seed=seed, device=dev, loss=loss)
                return apgd_untargeted(a, x, y, index, seed, draws)
            return run

        def apgd_t(x, y, index):
            a = APGDAttack_targeted(model, n_restarts=1, n_iter=steps, verbose=False, eps=eps, norm=norm,
                                    eot_iter=eot, rho=.75, seed=seed, device=dev,
                                    n_target_classes=n_targets(self.num_classes))
            return apgd_targeted(a, x, y, index, seed, draws)

        def fab_t(x, y, index):
            f = _FAB(model, n_restarts=1, n_iter=steps, eps=eps, seed=seed, norm=norm, verbose=False,
                     device=dev, targeted=True, n_target_classes=n_targets(self.num_classes))
            return fab_targeted(f, x, y, index, seed, draws)

        def square(x, y, index):
            sq = PerImageSquare(model, p_init=.8, n_queries=self.budget.get("queries", 5000), eps=eps, norm=norm,
                                n_restarts=1, seed=seed, verbose=False, device=dev, resc_schedule=False)
            return sq.perturb_images(x, y, index, draws)

        table = {"apgd-ce": apgd("ce"), "apgd-dlr": apgd("dlr"), "apgd-t": apgd_t, "fab-t": fab_t, "square": square}
        return {name: table[name] for name in VERSIONS[self.version]}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """AutoAttack's loop over its stages: an image leaves once a stage's point is misclassified — in one query
        of a deterministic model (``run_standard_evaluation``'s rule), in every one of ``GATE_DRAWS`` fresh
        classifications of a randomized one — and keeps the point misclassified in the most draws so far (the
        clean image where no stage does better)."""
        draws = self._draws()
        correct = correct_draws(self.model, x, y, draws)
        x_adv = x.clone()
        with _quiet():
            for run in self.stages().values():
                todo = (correct > 0).nonzero().flatten()
                if todo.numel() == 0:
                    break
                with noise.rows(todo):
                    adv = run(x[todo], y[todo], index[todo.cpu()])
                    c = correct_draws(self.model, adv, y[todo], draws)
                better = c < correct[todo]
                x_adv[todo[better]] = adv[better]
                correct[todo[better]] = c[better]
        return x_adv


class AutoAttackRand(AutoAttackStandard):
    """AutoAttack, rand version for randomized defences (APGD-CE and APGD-DLR with 20 EoT samples)."""

    name = "aa-rand"
    version = "rand"
    defaults = {"steps": 100, "eot_iter": 20}


class Square(Attack):
    """Square attack (score-based black box), 5000 queries, AutoAttack's settings (p_init 0.8), per-image seeded."""

    name = "square"
    defaults = {"queries": 5000, "restarts": 1}
    norms = ("Linf", "L2")
    gradient = False
    # 1 was pyautoattack's SquareAttack on each batch (one window per batch and iteration); 2 skipped, on a
    # randomized model, images and restarts by one noise draw
    revision = 3

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        sq = PerImageSquare(self.model, p_init=0.8, n_queries=self.budget["queries"], eps=self.eps, norm=self.norm,
                            n_restarts=self.budget["restarts"], seed=self.seed, verbose=False, device=self.device,
                            resc_schedule=False)
        return sq.perturb_images(x, y, index, GATE_DRAWS if self.randomized else 1)


class FABTargeted(Attack):
    """Targeted FAB (FAB-T) as AutoAttack's standard version runs it: 100 steps, 1 restart, 9 target classes
    (``igd audit``'s stronger AutoAttack gives it more restarts, as the paper's Table 9 does)."""

    name = "fab-t"
    defaults = {"steps": 100, "restarts": 1}
    norms = ("Linf", "L2")
    # 1 seeded FAB's random restarts once per batch; 2 skipped, on a randomized model, targets and restarts by
    # one noise draw
    revision = 3

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        fab = _FAB(self.model, n_restarts=self.budget["restarts"], n_iter=self.budget["steps"], eps=self.eps,
                   seed=self.seed, norm=self.norm, verbose=False, device=self.device, targeted=True,
                   n_target_classes=n_targets(self.num_classes))
        with _quiet():
            return fab_targeted(fab, x, y, index, self.seed, GATE_DRAWS if self.randomized else 1)
