"""Step 1 of IG-Defense: class-wise neuron importance ``I`` (N, C) at the masked layer.

``METHODS`` maps ``--method`` to a :class:`Method`: ``params(req)`` (the settings recorded in the artifact, known
before any work so that a finished shard can be recognised and skipped) and ``run(req)`` (the rows
``req.neurons`` of ``I``). :func:`rank` runs one method and writes the ``importance`` artifact, or an
``importance-shard`` for a block of rows (see :mod:`igd_cli.shards`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..artifacts import read_metadata, save_artifact
from ..console import err_console
from ..data import ImageSet
from ..errors import IgdError
from ..precision import precision_meta
from ..provenance import difference, refusal


@dataclass
class RankRequest:
    """Everything a ranking method may need; ``neurons`` = rows A..B-1 to compute."""

    model: nn.Module
    layer: str  # full dotted name
    n_neurons: int
    num_classes: int
    data: ImageSet
    neurons: tuple[int, int]
    batch_size: int = 128
    seed: int = 0
    exact_naive: bool = False
    lo_ir_path: str = "auto"
    clip_model: str = "ViT-B-16"
    clip_pretrained: str = "openai"
    clip_cache: Path | None = None
    clip_template: str = "{}"
    show_progress: bool = True
    clip_batch_size: int | None = None  # CLIP's encoding batch (default: batch_size)
    precision: str = "fp32"  # the model's forwards under autocast (lo-ir, cd-ir's activations); igd_cli.precision


@dataclass
class RankOutput:
    importance: torch.Tensor  # float32 (B - A, C), CPU
    info: dict[str, Any] = field(default_factory=dict)  # how it was computed (not part of the identity)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    params: Callable[[RankRequest], dict[str, Any]]
    run: Callable[[RankRequest], RankOutput]


# --- the methods ---------------------------------------------------------------------------------------

def _lo_ir_params(req: RankRequest) -> dict[str, Any]:
    # a reduced precision runs up to the layer only, the logit changes are fp32 (ranking.lo_ir): rankings made when
    # both logits were rounded (no such key) are not this computation and are not reused
    reduced = {"logit_changes": "fp32"} if precision_meta(req.precision) else {}
    return {"ablation": "zero the neuron (whole channel)", "statistic": "mean |change of ground-truth logit|",
            "empty_class": 0.0, **precision_meta(req.precision), **reduced}


def _lo_ir_run(req: RankRequest) -> RankOutput:
    from .lo_ir import lo_ir

    path = "naive" if req.exact_naive else req.lo_ir_path
    res = lo_ir(req.model, req.layer, req.data, req.num_classes, neurons=req.neurons, batch_size=req.batch_size,
                path=path, show_progress=req.show_progress, precision=req.precision)
    empty = [i for i, c in enumerate(res.class_counts.tolist()) if c == 0]
    if empty:
        err_console.print(f"note: classes {empty} have no probe image: their importance is 0")
    info = {"path": res.path, "fallback_reason": res.reason, "classes_without_probes": empty}
    return RankOutput(res.importance, info)


def _cd_ir_params(req: RankRequest) -> dict[str, Any]:
    from .cd_ir import params

    return {**params(req.clip_model, req.clip_pretrained, req.clip_template, len(req.data)),
            **precision_meta(req.precision)}


def _cd_ir_run(req: RankRequest) -> RankOutput:
    from .cd_ir import cd_ir

    res = cd_ir(req.model, req.layer, req.data, neurons=req.neurons, clip_model=req.clip_model,
                clip_pretrained=req.clip_pretrained, template=req.clip_template, cache=req.clip_cache,
                batch_size=req.batch_size, show_progress=req.show_progress, precision=req.precision,
                clip_batch_size=req.clip_batch_size)
    return RankOutput(res.importance, {"path": "soft-wpmi", "clip_cache": str(res.cache),
                                       "clip_cache_reused": res.cache_reused, **res.info})


def _random_params(req: RankRequest) -> dict[str, Any]:
    from .random_ir import DISTRIBUTION

    return {"seed": req.seed, "distribution": DISTRIBUTION}


def _random_run(req: RankRequest) -> RankOutput:
    from .random_ir import random_importance

    return RankOutput(random_importance(req.n_neurons, req.num_classes, req.seed, req.neurons), {"path": "random"})


#: ``--method`` -> implementation
METHODS: dict[str, Method] = {
    "lo-ir": Method("lo-ir", "leave-one-out: mean |logit change| when the neuron is zeroed", _lo_ir_params,
                    _lo_ir_run),
    "cd-ir": Method("cd-ir", "CLIP-Dissect soft-WPMI between activations and CLIP image-class similarity",
                    _cd_ir_params, _cd_ir_run),
    "random": Method("random", "seeded uniform random importance (ablation baseline)", _random_params, _random_run),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise IgdError(f"--method {name}: unknown (choose from {', '.join(METHODS)})")
    return METHODS[name]


# --- one ranking run -----------------------------------------------------------------------------------

@dataclass
class RankResult:
    out: Path
    kind: str  # importance | importance-shard
    shape: tuple[int, int]
    seconds: float
    skipped: bool
    meta: dict[str, Any]


def rank_meta(provenance: dict[str, Any], req: RankRequest, method: Method) -> dict[str, Any]:
    """The identity of a ranking run as recorded in the artifact (provenance, layer, method, data, params);
    ``data`` names the images for people, ``data_id`` identifies them by content (what reuse compares)."""
    return {**provenance, "layer": req.layer, "method": method.name, "n_neurons": req.n_neurons,
            "data": {"dataset": req.data.name, "split": req.data.split, "n": len(req.data)},
            "data_id": req.data.identity(), "params": method.params(req)}


def _made_otherwise(path: Path, meta: dict[str, Any]) -> tuple[str, str, str] | None:
    """Whether ``path`` was made by other igd code or with other numerics than ``meta`` (:func:`difference`)."""
    try:
        return difference(read_metadata(path), meta)
    except IgdError:
        return None


def rank(req: RankRequest, method_name: str, provenance: dict[str, Any], out: Path, *,
         force: bool = False, shard: bool | None = None, note: dict[str, Any] | None = None) -> RankResult:
    """Compute rows ``req.neurons`` with the method and write the artifact atomically; a complete file at ``out``
    made with the same identity is kept and the work skipped (resume), unless ``force``. ``shard``: write an
    ``importance-shard`` (True; what ``--neurons`` asks for, even for 0:N), the full ``importance`` (False), or
    decide from the range (None). ``note``: metadata recorded but not part of the identity (how the layer was
    chosen)."""
    from ..shards import matching_artifact

    method = get_method(method_name)
    a, b = req.neurons
    if shard is None:
        shard = (a, b) != (0, req.n_neurons)
    if not shard and (a, b) != (0, req.n_neurons):
        raise ValueError("a partial range of neurons can only be written as a shard")
    kind = "importance-shard" if shard else "importance"
    meta = rank_meta(provenance, req, method)
    if kind == "importance-shard":
        meta["neurons"] = [a, b]
    shape = (b - a, req.num_classes)
    if not force:
        found = matching_artifact(out, kind, meta, shape)
        if found is not None:
            return RankResult(out, kind, shape, 0.0, True, found)
        if out.exists():
            made = _made_otherwise(out, meta)
            err_console.print(f"note: {out}: {refusal(made)}: recomputing it" if made else
                              f"note: {out} exists but was made with other settings: recomputing it",
                              highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    res = method.run(req)
    seconds = time.perf_counter() - t0
    imp = res.importance.to(torch.float32).contiguous()
    if tuple(imp.shape) != shape:  # a bug guard, not a user error
        raise RuntimeError(f"{method.name} returned shape {tuple(imp.shape)}, expected {shape}")
    if not torch.isfinite(imp).all():
        raise IgdError(f"{method.name} produced non-finite importance values at {req.layer} (check the model)")
    meta.update({"seconds": round(seconds, 3), "details": res.info, **(note or {})})
    save_artifact(out, kind, {"importance": imp}, meta)
    return RankResult(out, kind, shape, seconds, False, meta)
