"""Attacks by ``--attack`` name (CLI.md): ``make_attack(name, model, eps=..., ...)`` builds one.

Every attack is an :class:`~igd_cli.attacks.base.Attack`: ``attack(x, y, index) -> x_adv`` inside the ε-ball
and [0, 1]; :func:`~igd_cli.attacks.base.run_attack` runs one over an ``ImageSet`` with a progress bar.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import IgdError
from .adaptive import Adaptive
from .apgd import APGD, APGDCW, APGDEoT, APGDTargetedDLR
from .autoattack import AutoAttackRand, AutoAttackStandard, FABTargeted, Square
from .base import BUDGET_KEYS, Attack, AttackResult, predict, reseed, run_attack
from .pgd import FGSM, PGD
from .rays import RayS

#: ``--attack`` name -> attack class, in CLI.md's order.
ATTACKS: dict[str, type[Attack]] = {
    "aa": AutoAttackStandard,
    "aa-rand": AutoAttackRand,
    "apgd-ce": APGD,
    "apgd-cw": APGDCW,
    "apgd-t-dlr": APGDTargetedDLR,
    "apgd-eot": APGDEoT,
    "rays": RayS,
    "square": Square,
    "pgd": PGD,
    "fgsm": FGSM,
    "fab-t": FABTargeted,
    "adaptive": Adaptive,  # beyond the paper: designed against IG-Defense (docs/adaptive.md)
}


def attack_class(name: str) -> type[Attack]:
    """The class of ``--attack NAME`` or a one-line error listing the names."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise IgdError(f"--attack {name}: unknown attack (choose from {', '.join(ATTACKS)})") from None


def make_attack(name: str, model: nn.Module, *, eps: float, norm: str = "Linf", seed: int = 0, device=None,
                num_classes: int | None = None, randomized: bool | None = None, strict: bool = True,
                steps: int | None = None, restarts: int | None = None, queries: int | None = None,
                eot_iter: int | None = None, bpda_temperature: float | None = None) -> Attack:
    """Build attack ``name`` on ``model``; budget overrides of None keep the paper's defaults.

    With ``strict=False`` overrides the attack has no use for are ignored (used for attack ensembles).
    ``bpda_temperature``: the ``adaptive`` attack's BPDA temperature (None: its default; refused by the others
    with ``strict``).

    Example::

        atk = make_attack("apgd-ce", defense, eps=8 / 255, steps=20)   # ATTACKS lists the names
        b = images.get(0, 32)
        x_adv = atk(b.x, b.y, b.index)        # per-image randomness: the same points in any batch
    """
    cls = attack_class(name)
    extra: dict = {}
    if bpda_temperature is not None:
        if cls is Adaptive:
            extra["bpda_temperature"] = bpda_temperature
        elif strict:
            raise IgdError(f"--bpda-temperature: only the adaptive attack uses it, not {name}")
    return cls(model, eps=eps, norm=norm, seed=seed, device=device, num_classes=num_classes,
               randomized=randomized, strict=strict, steps=steps, restarts=restarts, queries=queries,
               eot_iter=eot_iter, **extra)


__all__ = ["ATTACKS", "BUDGET_KEYS", "Attack", "AttackResult", "attack_class", "make_attack", "predict",
           "reseed", "run_attack"]
