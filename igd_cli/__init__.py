"""igd: interpretability-guided test-time adversarial defence (Kulkarni & Weng, ECCV 2024) as a toolkit.

The ``igd`` command is :mod:`igd_cli.cli`; the names below are the library (docs/library.md).

Example::

    import igd_cli as igd

    target = igd.open_target("demo")                          # model + the data set it was trained for
    importance = igd.rank_neurons(target, target.data("train", 128))
    defense = igd.calibrate_defense(target, importance, target.data("test", 200))
    quick = igd.Budgets(steps=2, restarts=1, queries=20, eot_iter=1)     # a smoke run: the defaults are the paper's
    res = igd.evaluate_defense(target, defense, target.data("test", 8), "iw-wc", budgets=quick, draws=2)
    res.to_json()["worst_case"]

Importing ``igd_cli`` loads none of them (nor torch): each is imported from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it (relative to this package)
_EXPORTS: dict[str, str] = {
    # a model and its images
    "open_target": ".common", "Target": ".common",
    "load_model": ".models", "LoadedModel": ".models",
    "load_dataset": ".data", "ImageSet": ".data",
    # the defence
    "IGDefense": ".defense", "load_defense": ".defense", "topk_mask": ".defense",
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

