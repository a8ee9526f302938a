"""One small attack interface (like torchattacks): built with the model, ε, norm, budget, seed and device;
``attack(x, y, index) -> x_adv``, batched; plus :func:`run_attack`, which runs an attack over an ``ImageSet``.

Randomness is drawn per image wherever igd controls it: random starts, Square's windows and FAB's restarts from a
generator seeded with ``(seed, index)`` (RayS is deterministic), and a randomized defence's noise keyed by the
image's identity, the attack and the query's ordinal for that image (:mod:`igd_cli.noise`: ``Attack.__call__``
declares the images of its batch; an attack querying a subset of them declares it with
:func:`igd_cli.noise.rows`). An image's adversarial point therefore does not depend on which other images share
its batch: batch size, ``--shard`` and the skipping of broken images in IW-WC give the same points, with or
without randomized smoothing. AutoAttack, Square and FAB are composed from pyautoattack's pieces with per-image
generators (:mod:`igd_cli.attacks.autoattack`), so the same holds for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from .. import contract, noise
from ..console import progress
from ..data import ImageSet
from ..devices import module_device
from ..errors import IgdError

#: budget keys that can be overridden on the command line (``--steps`` ...), by attack.
BUDGET_KEYS = ("steps", "restarts", "queries", "eot_iter")
_MASK63 = (1 << 63) - 1
#: float32 rounding of ``x ± ε`` for x in [0, 1]: a few ulps of 1.0
ROUNDING = 1e-6


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index`` (its position in the split) under the run seed ``seed``."""
    return (int(seed) * 1_000_003 + int(index) * 7919 + 0x9E3779B97F4A7C15) & _MASK63


def image_generators(seed: int, index: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per image (CPU, as pyautoattack draws its starts on CPU and moves them)."""
    return [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in index.tolist()]


def is_randomized(model: nn.Module) -> bool:
    """True for models whose output is random (a defence declaring ``randomized``: :mod:`igd_cli.contract`)."""
    return contract.randomized(model)


def attack_stream(seed: int, name: str) -> int:
    """The noise stream attack ``name`` queries a randomized model on under the run's ``seed``: its own, never
    the evaluation's (:func:`igd_cli.scoring.score_stream`), so a point an attack kept because one noise draw
    misclassified it is judged under independent draws, as a deployed defence drawing fresh noise judges it."""
    return noise.stream(seed, f"attack:{name}")


def reseed(model: nn.Module, seed: int) -> None:
    """Restart a randomized model's fallback noise stream (used outside an image block; a no-op for
    deterministic models)."""
    fn = getattr(model, "reseed", None)
    if callable(fn):
        fn(seed)


#: classifications of a point that decide, on a randomized model, between an attack's restarts, stages and
#: targets (one draw never decides: near the boundary it is a coin toss); a deterministic model needs one
GATE_DRAWS = 5


@torch.no_grad()
def correct_draws(model: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int) -> torch.Tensor:
    """In how many of ``draws`` classifications of the rows of ``x`` the model is right (each a fresh query)."""
    return sum((model(x).argmax(1) == y).long() for _ in range(draws))


class DrawsPick:
    """Per image, the point wrong in the most of ``draws`` fresh classifications among the points offered (ties:
    the first offered): the repeated-draw rule igd scores with, applied inside an attack to choose between its
    restarts, targets or stages. A single offer is returned without a query.

    Example::

        pick = DrawsPick(model, y, draws=5)
        for restart in range(3):
            pick.offer(run_once(x, y))
        x_adv = pick.points
    """

    def __init__(self, model: nn.Module, y: torch.Tensor, draws: int):
        self.model, self.y, self.draws = model, y, int(draws)
        self.points: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # None until a second point is offered

    def offer(self, points: torch.Tensor) -> None:
        if self.points is None:
            self.points = points.clone()
            return
        if self.counts is None:
            self.counts = correct_draws(self.model, self.points, self.y, self.draws)
        counts = correct_draws(self.model, points, self.y, self.draws)
        better = counts < self.counts
        self.points[better] = points[better]
        self.counts = torch.where(better, counts, self.counts)


class Attack:
    """Base class: subclasses set ``name``, ``defaults`` (the paper's budget) and implement ``perturb``.

    ``budget`` holds the defaults with the user's overrides; an override the attack has no use for is an
    :class:`IgdError` (with ``strict=True``) so that ``--queries`` on APGD does not pass silently.
    """

    name: ClassVar[str] = "attack"
    defaults: ClassVar[dict[str, int]] = {}
    norms: ClassVar[tuple[str, ...]] = ("Linf",)
    #: set when an attack's algorithm changed, so that sets made by the old one are not reused as its own
    revision: ClassVar[int | None] = None
    #: the attack follows the model's gradient (a model whose output has none makes it raise ``NoGradient``)
    gradient: ClassVar[bool] = True
    #: the attacks this one runs as parts (the adaptive attack's stage 1 is ``apgd-eot``): their revisions are part
    #: of its own (:meth:`revisions`), as are those of the attacks it subclasses
    built_from: ClassVar[tuple[type["Attack"], ...]] = ()

    def __init__(self, model: nn.Module, *, eps: float, norm: str = "Linf", seed: int = 0,
                 device: torch.device | str | None = None, num_classes: int | None = None,
                 randomized: bool | None = None, strict: bool = True, **overrides: int | None):
        if norm not in self.norms:
            raise IgdError(f"attack {self.name} supports {', '.join(self.norms)}, not {norm}")
        if not (eps > 0):
            raise IgdError(f"attack {self.name}: ε must be positive, got {eps}")
        self.model = model
        self.eps = float(eps)
        self.norm = norm
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else module_device(model)
        self.num_classes = num_classes
        self.randomized = is_randomized(model) if randomized is None else bool(randomized)
        self.budget: dict[str, int] = dict(self.defaults)
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in self.defaults:
                if strict:
                    flag = "--" + key.replace("_", "-")
                    raise IgdError(f"attack {self.name} has no {flag} budget "
                                   f"(it takes: {', '.join('--' + k.replace('_', '-') for k in self.defaults) or 'none'})")
                continue
            if int(value) < 1:
                raise IgdError(f"--{key.replace('_', '-')} {value}: must be at least 1")
            self.budget[key] = int(value)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def followed(self) -> list[tuple[nn.Module, str]]:
        """The models whose gradient the attack follows, each with how to name it (none for a black-box one)."""
        return [(self.model, "attacked model")] if self.gradient else []

    def check_gradient(self, x: torch.Tensor) -> None:
        """Raise :class:`igd_cli.contract.NoGradient` when a model the attack follows has no gradient at ``x``
        (checked once per attack, on its first batch)."""
        if getattr(self, "_gradient_checked", False):
            return
        for model, what in self.followed():
            if not contract.has_gradient(model, x):
                raise contract.NoGradient(
                    f"--attack {self.name} follows the gradient of the {what}, whose output has none (requires_grad "
                    "is lost in its forward): attack it with rays or square, or give the defence a surrogate(x) "
                    "(BPDA) for --attack adaptive")
        self._gradient_checked = True

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial points for a batch (on the attack's device), inside the ε-ball and [0, 1]."""
        # the images' own float dtype (float32 from igd's data; float64 for a float64 model): never the default
        x = x.to(self.device, x.dtype if x.is_floating_point() else torch.float32)
        y = y.to(self.device, torch.int64)
        if index is None:
            index = torch.arange(len(x), dtype=torch.int64)
        if len(x) == 0:
            return x.clone()
        index = index.cpu()
        self.check_gradient(x)
        with noise.images(noise.image_keys(index, x), attack_stream(self.seed, self.name)):
            x_adv = self.perturb(x, y, index).detach()
        return project(x_adv, x, self.eps, self.norm)

    @classmethod
    def revisions(cls) -> dict[str, int]:
        """Attack name -> revision, of this attack and of every attack it is built from (:attr:`built_from`) or
        subclasses, those that set one: what identifies its algorithm (a new revision of a part is a new
        algorithm of the whole)."""
        out: dict[str, int] = {}
        for part in (*(b for b in cls.__mro__[1:] if issubclass(b, Attack) and b is not Attack), *cls.built_from):
            out.update(part.revisions())
        own = cls.__dict__.get("revision")
        if own is not None:
            out[cls.name] = own
        return dict(sorted(out.items()))

    def describe(self) -> dict[str, Any]:
        info = {"attack": self.name, "eps": self.eps, "norm": self.norm, "budget": dict(self.budget),
                "seed": self.seed}
        revisions = self.revisions()
        return {**info, "revision": revisions} if revisions else info


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "Linf") -> torch.Tensor:
    """Safety net: the projection onto the ε-ball around ``x`` and [0, 1]; the identity on points inside (up to
    the float32 rounding of ``x ± ε``, which the attacks' own clamping produces)."""
    if norm == "Linf":
        delta = x_adv - x
        if delta.abs().amax() <= eps + ROUNDING and x_adv.min() >= 0 and x_adv.max() <= 1:
            return x_adv
        return (x + delta.clamp(-eps, eps)).clamp(0.0, 1.0)
    delta = (x_adv - x).flatten(1)
    norms = delta.norm(dim=1, keepdim=True)
    if (norms <= eps * (1 + 1e-6)).all() and x_adv.min() >= 0 and x_adv.max() <= 1:
        return x_adv
    delta = delta * torch.clamp(eps / (norms + 1e-12), max=1.0)
    return (x + delta.view_as(x)).clamp(0.0, 1.0)


@dataclass
class AttackResult:
    """Adversarial points of the images at ``index`` (positions in the split), on CPU."""

    x_adv: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
            device: torch.device | None = None) -> torch.Tensor:
    """Predicted labels (CPU int64) of ``x``, in batches."""
    device = device or module_device(model)
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model(x[i:i + batch_size].to(device)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def run_attack(attack: Attack, data: ImageSet, *, batch_size: int = 128,
               positions: Sequence[int] | torch.Tensor | None = None, description: str | None = None,
               show_progress: bool = True) -> AttackResult:
    """Run ``attack`` over the images of ``data`` at ``positions`` (default: all), in batches, with a progress
    bar; returns the adversarial points with their labels and positions (CPU).

    Example::

        res = run_attack(make_attack("fgsm", model, eps=8 / 255), images, batch_size=256)
        res.x_adv, res.y, res.index
    """
    import time

    if positions is None:
        positions = torch.arange(len(data), dtype=torch.int64)
    positions = torch.as_tensor(positions, dtype=torch.int64).flatten()
    if len(positions) and (positions.min() < 0 or positions.max() >= len(data)):
        raise IgdError(f"image positions out of range 0..{len(data) - 1}")
    start = time.perf_counter()
    xs, ys = [], []
    with progress() as bar:
        task = bar.add_task(description or attack.name, total=len(positions), visible=show_progress)
        for b in range(0, len(positions), batch_size):
            pos = positions[b:b + batch_size]
            x, y = gather(data, pos)
            xs.append(attack(x, y, pos).cpu())
            ys.append(y)
            bar.advance(task, len(pos))
    x_adv = torch.cat(xs) if xs else torch.empty(0)
    y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)
    return AttackResult(x_adv, y, positions.clone(), time.perf_counter() - start, attack.describe())


def gather(data: ImageSet, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images at arbitrary positions, read in contiguous runs."""
    if len(pos) == 0:
        raise IgdError("no images to attack")
    p = pos.tolist()
    if p == list(range(p[0], p[0] + len(p))):
        b = data.get(p[0], p[0] + len(p))
        return b.x, b.y
    xs, ys = [], []
    run_start = prev = p[0]
    for q in p[1:] + [None]:
        if q is not None and q == prev + 1:
            prev = q
            continue
        b = data.get(run_start, prev + 1)
        xs.append(b.x)
        ys.append(b.y)
        if q is not None:
            run_start = prev = q
    return torch.cat(xs), torch.cat(ys)
