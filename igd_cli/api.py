"""The few library calls a notebook needs that the CLI's modules do not offer as one call: rank a model's neurons,
build an IG-Defense from a ranking and k, choose k, and evaluate a defence built in memory with its attack sets
keyed by what it is. Each is a thin composition of the functions the commands use (:mod:`igd_cli.ranking`,
:mod:`igd_cli.defense`, :mod:`igd_cli.calibrate`, :mod:`igd_cli.evaluate`); ``igd_cli`` re-exports them with the
rest of the public API (docs/library.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .analysis.setup import mask_identity
from .artifacts import load_artifact
from .calibrate import calibrate_k, load_importance
from .common import Target, check_classes, model_input_shape, resolve_model_layer
from .console import progress_enabled
from .data import ImageSet
from .defense import DEFAULT_N_SMOOTH, DEFAULT_TAU, IGDefense, check_importance, topk_mask
from .errors import IgdError
from .eval_result import EvalResult
from .evaluate import defense_identity
from .evaluate import evaluate_defense as _evaluate_defense
from .ranking import RankRequest, get_method, rank

#: what needs ε when smoothing is on and no σ is given (Target.default_eps's error names it)
_FOR_SIGMA = "σ = ε/2 of the randomized smoothing; or pass sigma=..., or rs=False"


def rank_neurons(target: Target, data: ImageSet, method: str = "lo-ir", *, layer: str | None = None,
                 out: str | Path | None = None, seed: int = 0, batch_size: int = 128, precision: str = "fp32",
                 force: bool = False, **options: Any) -> torch.Tensor:
    """Class-wise importance (N, C) of the masked layer's neurons on the probe images ``data`` (``igd rank``):
    ``method`` is ``lo-ir``, ``cd-ir`` or ``random``; ``layer`` defaults to the model's masked layer (the
    penultimate one, or the module feeding the classifier). With ``out`` the importance artifact is written there
    (and reused when it holds this ranking, unless ``force``), for ``igd calibrate-k --importance`` or
    :func:`defense_from_ranking`. ``options``: the method's settings (``clip_model``, ``clip_pretrained``,
    ``clip_template``, ``clip_cache`` for CD-IR; ``exact_naive`` for LO-IR).

    Example::

        target = igd_cli.open_target("demo")
        importance = igd_cli.rank_neurons(target, target.data("train", 128), "lo-ir")   # (128, 10)
    """
    m = get_method(method)
    check_classes(target, data)
    full, n = resolve_model_layer(target, layer, tuple(data.get(0, 1).x.shape[1:]))
    req = RankRequest(model=target.model, layer=full, n_neurons=n, num_classes=target.loaded.num_classes,
                      data=data, neurons=(0, n), batch_size=batch_size, seed=seed, show_progress=progress_enabled(),
                      precision=precision, **options)
    if out is None:
        imp = m.run(req).importance.to(torch.float32)
        return check_importance(imp, where=f"{m.name} at {full}")
    res = rank(req, m.name, target.provenance(), Path(out), force=force, shard=False)
    return load_artifact(res.out, kind="importance")["importance"]


def _importance(target: Target, importance: torch.Tensor | str | Path, layer: str | None
                ) -> tuple[str, torch.Tensor]:
    """(layer, (N, C) importance) from a tensor for ``layer`` (default: the masked layer) or an importance file
    made for this model (its layer, checked against ``layer`` when given)."""
    shape = model_input_shape(target.loaded, None, target.dataset)
    if isinstance(importance, (str, Path)):
        _, full, imp = load_importance(importance, target, layer, shape)
        return full, imp
    full, n = resolve_model_layer(target, layer, shape)
    imp = check_importance(torch.as_tensor(importance), where="importance")
    if tuple(imp.shape) != (n, target.loaded.num_classes):
        raise IgdError(f"importance of shape {list(imp.shape)} does not fit layer {full} (N = {n}) and "
                       f"{target.loaded.num_classes} classes")
    return full, imp


def _sigma(target: Target, rs: bool, sigma: float | None, eps: float | None) -> float | None:
    """σ as IG-Defense uses it: the given one, else ε/2 (ε given, else the model's or data set's default)."""
    if not rs or sigma is not None:
        return sigma
    return (eps if eps is not None else target.default_eps(_FOR_SIGMA)) / 2


def defense_from_ranking(target: Target, importance: torch.Tensor | str | Path, k: int, *,
                         layer: str | None = None, eps: float | None = None, sigma: float | None = None,
                         tau: float = DEFAULT_TAU, n_smooth: int = DEFAULT_N_SMOOTH, rs: bool = True,
                         seed: int = 0) -> IGDefense:
    """IG-Defense on ``target``'s model keeping, for every class, the ``k`` neurons its ``importance`` ranks
    highest (a tensor (N, C) for ``layer``, default the masked layer, or an importance file). Smoothing noise
    ``σ = sigma``, else ``ε/2`` (``eps``, else the model's default ε); ``rs=False`` turns smoothing off.
    ``igd_cli.load_defense(target, "mask.safetensors")`` builds it from a mask file instead.

    Example::

        defense = igd_cli.defense_from_ranking(target, importance, k=16)
        defense.k, defense.sigma, defense.randomized          # (16, 0.1, True) on the demo model
    """
    full, imp = _importance(target, importance, layer)
    mask = topk_mask(imp, int(k)).to(target.device)
    return IGDefense(target.model, full, mask, tau=tau, sigma=_sigma(target, rs, sigma, eps), n_smooth=n_smooth,
                     rs=rs, seed=seed)


def calibrate_defense(target: Target, importance: torch.Tensor | str | Path, data: ImageSet, *,
                      tolerance: float = 0.5, k: int | None = None, layer: str | None = None,
                      eps: float | None = None, sigma: float | None = None, tau: float = DEFAULT_TAU,
                      n_smooth: int = DEFAULT_N_SMOOTH, rs: bool = True, seed: int = 0, batch_size: int = 128,
                      precision: str = "fp32") -> IGDefense:
    """``igd calibrate-k`` in memory: the IG-Defense whose k is the smallest the binary search finds with clean
    accuracy on ``data`` within ``tolerance`` points of the base model's (:func:`igd_cli.calibrate.calibrate_k`;
    ``k`` given: that k, evaluated). Its ``calibration`` attribute holds the search (``k``, ``accuracy``,
    ``base_accuracy``, ``curve``). Settings as :func:`defense_from_ranking`.

    Example::

        defense = igd_cli.calibrate_defense(target, importance, target.data("test", 200), tolerance=0.5)
        defense.k, defense.calibration.accuracy, defense.calibration.base_accuracy
    """
    check_classes(target, data)
    full, imp = _importance(target, importance, layer)
    settings = dict(layer=full, eps=eps, sigma=sigma, tau=tau, n_smooth=n_smooth, rs=rs, seed=seed)
    whole = defense_from_ranking(target, imp, imp.shape[0], **settings)  # k = N: every neuron kept
    cal = calibrate_k(whole, imp, data, tolerance=tolerance, batch_size=batch_size, k=k, precision=precision)
    defense = defense_from_ranking(target, imp, cal.k, **settings)
    defense.calibration = cal
    return defense


def defense_meta(defense: nn.Module) -> dict[str, Any] | None:
    """What keys a defence's attack sets apart from another's: a mask file's sha256 and the settings (built by
    ``load_defense``), an in-memory IG-Defense's masks and settings; None for a module igd cannot identify.

    Example::

        defense_meta(defense)["mask_sha256"], defense_meta(defense)["settings"]
    """
    art = getattr(defense, "mask_artifact", None)
    if art is not None:
        return defense_identity(art.path, defense)
    if isinstance(defense, IGDefense):
        return mask_identity(torch.cat([m.flatten() for m in defense.masks]), defense.layer, defense.settings())
    return None


def evaluate_defense(target: Target, defense: nn.Module | None, data: ImageSet, attack: str = "none",
                     **options: Any) -> EvalResult:
    """:func:`igd_cli.evaluate.evaluate_defense` (clean accuracy, one attack, or ``"iw-wc"`` with repeated-draw
    scoring of a randomized defence) with the defence's identity filled in (:func:`defense_meta`), so that
    attack sets kept in the work folder (default ``$IGD_HOME/adv/<model fingerprint>``) are reused only by the
    same defence. A defence igd cannot identify keeps no sets unless ``defense_meta`` names it.
    ``options``: ``eps``, ``budgets``, ``draws``, ``protocol``, ``seed``, ``workdir``, ``batch_size``, ...

    Example::

        quick = igd_cli.Budgets(steps=2, restarts=1, queries=20, eot_iter=1)   # a smoke run; default: the paper's
        res = igd_cli.evaluate_defense(target, defense, target.data("test", 8), "iw-wc", budgets=quick, draws=2)
        r = res.to_json()
        r["clean_accuracy"], r["worst_case"], r["worst_case_std"]
    """
    if defense is not None and options.get("defense_meta") is None:
        meta = defense_meta(defense)
        if meta is not None:
            options["defense_meta"] = meta
        elif "workdir" not in options:
            options["workdir"] = None  # nothing kept: another defence's sets could not be told from its own
        elif options["workdir"] is not None:
            raise IgdError("workdir: igd cannot tell this defence's attack sets from another's: pass "
                           "defense_meta={...} naming it (its source and settings), or workdir=None")
    return _evaluate_defense(target, defense, data, attack=attack, **options)

