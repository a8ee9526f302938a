"""The contract a test-time defence meets to go through igd's evaluation (docs/own-defense.md).

A defence is a callable ``NAME(base_model) -> nn.Module`` (``--defense path/to/file.py:NAME`` or
``module:NAME``): it takes the base model (an ``nn.Module`` on images in [0, 1]) and returns the defended model,
an ``nn.Module`` from images in [0, 1] to logits. What it returns may also have:

- ``randomized = True``: fresh randomness at every forward; igd scores it by repeated draws and attacks it
  with EoT (its draws are made reproducible by :func:`igd_cli.noise.query`);
- ``surrogate(x)`` (or ``surrogate(x, temperature)``): a differentiable stand-in whose output the adaptive
  attack follows in place of the forward's (BPDA, Athalye et al. 2018); the points are judged on the defence;
- ``first_pass(x)``: logits of a first, differentiable stage of the defence, which the adaptive attack attacks
  first (with EoT when randomized) and starts from;
- ``frozen(seed)``, ``changes_prediction(x)``, ``baseline(seed)``: what the audit's checks 8, 9 and 10 use.

IG-Defense (:class:`igd_cli.defense.IGDefense`) is one implementation; the evaluation, the attacks and the
audit reach a defence only through the functions below. A user's defence is wrapped in :class:`UserDefense`,
which makes every call of its forward, ``surrogate`` and ``first_pass`` one query of :mod:`igd_cli.noise`.

Example::

    defended = build_defense("examples/defenses/jpeg.py:jpeg", target.model)
    randomized(defended), surrogate(defended) is not None, identity(defended)["source_sha256"]
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
import torch.nn as nn

from . import noise
from .errors import IgdError

#: the command-line option that names a user's defence
OPTION = "--defense"


class NoGradient(IgdError):
    """A gradient attack met a model whose output has no gradient (``requires_grad`` lost in its forward)."""


# --- a user's defence -------------------------------------------------------------------------------------

class UserDefense(nn.Module):
    """A user's defended model as igd queries it: each call of its forward (and of ``surrogate``,
    ``first_pass``) is one query of :func:`igd_cli.noise.query`, so its own draws through
    :func:`igd_cli.noise.normal_like` are keyed by the image and the query's ordinal, and torch's default
    generator is seeded per query. ``frozen_seed``: every query gets the same draws (:func:`frozen`)."""

    def __init__(self, defense: nn.Module, spec: str, source_sha256: str | None, *, frozen_seed: int | None = None):
        super().__init__()
        self.defense = defense
        self.spec = spec
        self.source_sha256 = source_sha256
        self.frozen_seed = frozen_seed

    def extra_repr(self) -> str:  # the spec's path is not identity (a copied file is the same defence)
        return f"callable={self.spec.rpartition(':')[2]}" + ("" if self.frozen_seed is None else ", frozen")

    @property
    def randomized(self) -> bool:
        return self.frozen_seed is None and declared_randomized(self.defense)

    def _query(self, x: torch.Tensor):
        if noise.STRICT and self.randomized and noise.current_keys() is None:
            raise noise.UndeclaredQuery("a randomized defence was queried outside an igd_cli.noise.images block")
        return noise.query(x, frozen=self.frozen_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self._query(x):
            return self.defense(x)

    def call(self, name: str, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The defence's optional method ``name`` on ``x`` as one query."""
        with self._query(x):
            return getattr(self.defense, name)(x, **kwargs)

    def skip_noise(self, x: torch.Tensor, queries: int) -> None:
        """Advance the rows of ``x`` as ``queries`` queries would, running none (draws are keyed by ordinal)."""
        if self.frozen_seed is None:
            noise.skip(x, queries)

    def settings(self) -> dict[str, Any] | None:
        fn = getattr(self.defense, "settings", None)
        return dict(fn()) if callable(fn) else None

    def identity(self) -> dict[str, Any]:
        """What identifies the defence in caches and reports: the callable, its source file's sha256 and the
        defended model's fingerprint (weights, module tree and the files of its module classes), not the path."""
        from .models import fingerprint

        return {"defense": self.spec, "callable": self.spec.rpartition(":")[2], "source_sha256": self.source_sha256,
                "defense_fingerprint": fingerprint(self.defense), "settings": self.settings(),
                "randomized": self.randomized}


def build_defense(spec: str, base: nn.Module) -> UserDefense:
    """``--defense FILE.py:NAME`` / ``module:NAME``: ``NAME(base)`` checked to be an ``nn.Module``, in eval mode
    on the base model's device, wrapped for igd's queries; every problem is one :class:`IgdError` line."""
    from .artifacts import file_sha256
    from .devices import module_device
    from .user_arch import _why, resolve_callable, source_file

    fn = resolve_callable(spec, OPTION)
    name = spec.rpartition(":")[2]
    try:
        defended = fn(base)
    except Exception as exc:  # the user's code may fail in any way
        raise IgdError(f"{OPTION} {spec}: {name}(base_model) failed ({_why(exc)})") from exc
    if not isinstance(defended, nn.Module):
        raise IgdError(f"{OPTION} {spec}: {name}(base_model) returned an object of type {type(defended).__name__}, "
                       "not a torch.nn.Module")
    flag = getattr(defended, "randomized", False)
    if not isinstance(flag, bool) and not callable(flag):
        raise IgdError(f"{OPTION} {spec}: its randomized attribute is a {type(flag).__name__}, not True or False")
    for cap in ("surrogate", "first_pass", "frozen", "changes_prediction", "baseline"):
        if hasattr(defended, cap) and not callable(getattr(defended, cap)):
            raise IgdError(f"{OPTION} {spec}: its {cap} attribute is not callable")
    src = source_file(spec, OPTION)
    defended = defended.to(module_device(base)).eval()
    return UserDefense(defended, spec, file_sha256(src) if src is not None else None)


def check_exclusive(mask: Any, defense: Any) -> None:
    """``--mask`` (IG-Defense) and ``--defense`` (any defence) name the defended model two ways: one at most."""
    if mask is not None and defense is not None:
        raise IgdError("--mask and --defense both name the defended model: give one of them")


def open_defense(target: Any, mask: Any, spec: str | None, *, seed: int = 0, required: bool = True,
                 **settings: Any) -> nn.Module | None:
    """The defended model a command names: IG-Defense from ``--mask`` (with its ``settings`` overrides:
    ``sigma``, ``n_smooth``, ``tau``, ``rs``) or a user's ``--defense`` on ``target``'s model; None when neither is
    given and ``required`` is False."""
    check_exclusive(mask, spec)
    if spec is not None:
        given = [f"--{k.replace('_', '-')}" for k, v in settings.items() if v is not None]
        if given:
            raise IgdError(f"{', '.join(given)}: IG-Defense's settings (from --mask), not a --defense's")
        return build_defense(spec, target.model)
    if mask is None:
        if required:
            raise IgdError("no defended model: give --mask FILE (IG-Defense) or --defense FILE.py:NAME (your own)")
        return None
    from .defense import load_defense

    return load_defense(target, mask, seed=seed, **settings)


# --- the capabilities igd uses ----------------------------------------------------------------------------

def declared_randomized(model: nn.Module) -> bool:
    """What a module says of itself: ``randomized`` (a bool, or a method returning one)."""
    flag = getattr(model, "randomized", None)
    if isinstance(flag, bool):
        return flag
    if callable(flag):
        return bool(flag())
    return False


def randomized(model: nn.Module) -> bool:
    """True for a model whose output is random: scored by repeated draws and attacked with EoT."""
    return declared_randomized(model)


class Capability(nn.Module):
    """An optional method of a defence as a model an attack can query: ``fn(x)``, random when the defence is."""

    def __init__(self, defense: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.defense = defense
        self.fn = fn

    @property
    def randomized(self) -> bool:
        return randomized(self.defense)

    def skip_noise(self, x: torch.Tensor, queries: int) -> None:
        skip = getattr(self.defense, "skip_noise", None)
        if callable(skip):
            skip(x, queries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _method(model: nn.Module, name: str) -> Callable[..., torch.Tensor] | None:
    """The defence's optional method ``name`` (on a :class:`UserDefense`: the user's, called as one query)."""
    inner = model.defense if isinstance(model, UserDefense) else model
    fn = getattr(inner, name, None)
    if not callable(fn):
        return None
    if isinstance(model, UserDefense):
        return lambda x, **kw: model.call(name, x, **kw)
    return fn


def takes_temperature(model: nn.Module) -> bool:
    """Whether the defence's ``surrogate`` takes a ``temperature`` (the adaptive attack's ``--bpda-temperature``)."""
    inner = model.defense if isinstance(model, UserDefense) else model
    fn = getattr(inner, "surrogate", None)
    if not callable(fn):
        return False
    try:
        return "temperature" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def surrogate(model: nn.Module, temperature: float | None = None) -> nn.Module | None:
    """The model the adaptive attack follows in place of the defence (BPDA): ``surrogate(x)``, given
    ``temperature`` when it takes one; None when the defence has none."""
    fn = _method(model, "surrogate")
    if fn is None:
        return None
    if temperature is not None and takes_temperature(model):
        return Capability(model, lambda x: fn(x, temperature=temperature))
    return Capability(model, fn)


def first_pass(model: nn.Module) -> nn.Module | None:
    """The defence's first stage as a model (``first_pass(x)`` -> logits), or None."""
    fn = _method(model, "first_pass")
    return None if fn is None else Capability(model, fn)


def frozen(model: nn.Module, seed: int = 0) -> nn.Module | None:
    """The defence with its randomness frozen to one draw (deterministic, differentiable where it is): its own
    ``frozen(seed)``, or for a user's defence every query under :func:`igd_cli.noise.query`'s frozen draws (its
    ``igd_cli.noise`` draws fixed, torch's generator seeded the same at every forward); None when it cannot be."""
    own = getattr(model.defense if isinstance(model, UserDefense) else model, "frozen", None)
    if isinstance(model, UserDefense):
        if callable(own):
            return UserDefense(own(seed), model.spec, model.source_sha256, frozen_seed=seed)
        out = copy.copy(model)  # shares the user's module; its own frozen seed
        out.frozen_seed = int(seed)
        return out
    return own(seed) if callable(own) else None


def changes_prediction(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``changes_prediction(x) -> (B,) bool``: per row of one query, whether the defence's own mechanism changed
    the prediction (IG-Defense: the mask, against argmax of its pseudo-label; check 9), or None."""
    return _method(model, "changes_prediction")


def baseline(model: nn.Module, seed: int = 0) -> nn.Module | None:
    """The defence without its own mechanism (IG-Defense: smoothing alone; check 10), or None."""
    inner = model.defense if isinstance(model, UserDefense) else model
    fn = getattr(inner, "baseline", None)
    if not callable(fn):
        return None
    base = fn(seed)
    return UserDefense(base, model.spec, model.source_sha256) if isinstance(model, UserDefense) else base


def identity(model: nn.Module) -> dict[str, Any] | None:
    """What identifies the defence in caches and reports (its ``identity()``), or None."""
    fn = getattr(model, "identity", None)
    return dict(fn()) if callable(fn) else None


def adaptive_column(model: nn.Module) -> bool:
    """Whether IW-WC adds the adaptive column for ``model``: a user's defence, or one with a capability the
    adaptive attack uses (``surrogate``, ``first_pass``: IG-Defense). Plain modules (the audit's and analyses'
    variants, e.g. smoothing alone) keep the paper's nine."""
    return isinstance(model, UserDefense) or _method(model, "surrogate") is not None or \
        _method(model, "first_pass") is not None


def settings(model: nn.Module) -> dict[str, Any] | None:
    """The defence's settings for reports (its ``settings()``), or None."""
    fn = getattr(model, "settings", None)
    return fn() if callable(fn) else None


def label(model: nn.Module | None) -> str:
    """How tables name the defended model: IG-Defense, or the callable of a user's defence."""
    if isinstance(model, UserDefense):
        return model.spec.rpartition(":")[2]
    return "IG-Defense"


@torch.no_grad()
def _probe_rows(x: torch.Tensor) -> torch.Tensor:
    return x[: min(2, len(x))].detach().clone()


def has_gradient(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model``'s output on (the first rows of) ``x`` has a gradient: one forward, made in a noise block
    of its own so that no image's query ordinals move."""
    xr = _probe_rows(x).requires_grad_(True)
    keys = noise.image_keys(None, xr.detach())
    with torch.enable_grad(), noise.images(keys, noise.stream(0, "gradient-probe")):
        out = model(xr)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return False
        # requires_grad through the model's own parameters alone is no gradient to the input
        (g,) = torch.autograd.grad(out.float().sum(), xr, allow_unused=True)
    return g is not None


__all__ = ["Capability", "NoGradient", "OPTION", "UserDefense", "baseline", "build_defense", "changes_prediction",
           "adaptive_column", "check_exclusive", "declared_randomized", "first_pass", "frozen", "has_gradient",
           "identity", "label", "open_defense", "randomized", "settings", "surrogate", "takes_temperature"]
