"""igd: interpretability-guided test-time adversarial defence (Kulkarni & Weng, ECCV 2024) as a toolkit.

The ``igd`` command is :mod:`igd_cli.cli`; the names below are the library (docs/library.md)::

    import igd_cli as igd

    target = igd.open_target("demo")                          # model + the data set it was trained for
    importance = igd.rank_neurons(target, target.data("train", 256))
    defense = igd.calibrate_defense(target, importance, target.data("test", 200))
    res = igd.evaluate_defense(target, defense, target.data("test", 100), "iw-wc")

Importing ``igd_cli`` loads none of them (nor torch): each is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    # a model and its images
    "open_target": ".common", "Target": ".common",
    "load_model": ".models", "LoadedModel": ".models",
    "load_dataset": ".data", "ImageSet": ".data",
    # the defence
    "IGDefense": ".defense", "load_defense": ".defense",
    "defense_from_ranking": ".api", "calibrate_defense": ".api",
    # ranking and choosing k
    "rank_neurons": ".api", "calibrate_k": ".calibrate", "Calibration": ".calibrate",
    "run_calibration": ".calibrate",
    # evaluation
    "evaluate_defense": ".api", "defense_meta": ".api", "EvalResult": ".eval_result", "Budgets": ".evaluate",
    "classify": ".scoring", "Score": ".scoring",
    "make_attack": ".attacks", "run_attack": ".attacks", "ATTACKS": ".attacks",
    # the audit
    "Audit": ".audit", "run_audit": ".audit",
    # results to submit or compare
    "model_info": ".leaderboard", "write_model_info": ".leaderboard",
    # errors
    "IgdError": ".errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use (then kept here)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # pragma: no cover  (for type checkers and editors: the same names, imported eagerly)
    from .api import calibrate_defense, defense_from_ranking, defense_meta, evaluate_defense, rank_neurons
    from .attacks import ATTACKS, make_attack, run_attack
    from .audit import Audit, run_audit
    from .calibrate import Calibration, calibrate_k, run_calibration
    from .common import Target, open_target
    from .data import ImageSet, load_dataset
    from .defense import IGDefense, load_defense
    from .errors import IgdError
    from .eval_result import EvalResult
    from .evaluate import Budgets
    from .leaderboard import model_info, write_model_info
    from .models import LoadedModel, load_model
    from .scoring import Score, classify
