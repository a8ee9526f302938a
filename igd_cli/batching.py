"""``--batch-size auto``: the largest batch of a stage's real workload that fits on the CUDA device.

:func:`largest_batch` takes the workload as a callable ``try_batch(b)`` (run one batch of ``b`` images; raise
``torch.cuda.OutOfMemoryError`` when it does not fit), doubles ``b`` until it runs out of memory or reaches the
cap, then binary-searches between the last fit and the first OOM. The trial workloads (``*_trial``) are one batch
of what the stage really runs. On a CPU there is nothing to search: ``auto`` is the command's default, and a note
says so.

Example::

    bs = resolve_batch_size("auto", default=128, device=target.device, cap=len(data),
                            try_batch=rank_trial(req, "lo-ir"), what="LO-IR")
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import noise
from .console import err_console
from .devices import module_device
from .errors import IgdError
from .precision import autocast, memory_format

#: the largest batch ``auto`` tries (and never more than the stage's images)
MAX_AUTO_BATCH = 4096


def parse_batch_size(text: str | int) -> int | str:
    """``--batch-size``: a whole number >= 1, or ``auto``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        t = str(text).strip().lower()
        if t == "auto":
            return "auto"
        try:
            value = int(t)
        except ValueError as exc:
            raise IgdError(f"--batch-size {text}: expected a whole number >= 1 or auto") from exc
    if value < 1:
        raise IgdError(f"--batch-size {value}: must be at least 1 (or auto)")
    return value


def is_oom(exc: BaseException) -> bool:
    """An out-of-memory error of the accelerator (``torch.cuda.OutOfMemoryError`` is ``torch.OutOfMemoryError``)."""
    return isinstance(exc, torch.OutOfMemoryError)


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(try_batch: Callable[[int], Any], cap: int, start: int = 1) -> int:
    """The largest ``b`` in ``[1, cap]`` with ``try_batch(b)`` free of OOM (memory grows with ``b``): doubling from
    ``start``, then binary search; any other exception propagates. ``IgdError`` when not even 1 fits."""
    if cap < 1:
        raise ValueError(f"cap {cap}: must be at least 1")

    def fits(b: int) -> bool:
        try:
            try_batch(b)
            return True
        except Exception as exc:  # noqa: BLE001 - only OOM is a verdict; the rest is re-raised
            if not is_oom(exc):
                raise
            _free()
            return False

    b = max(1, min(start, cap))
    if fits(b):
        lo, hi = b, None  # lo fits; hi (once found) does not
        while lo < cap:
            nxt = min(cap, 2 * lo)
            if fits(nxt):
                lo = nxt
            else:
                hi = nxt
                break
        if hi is None:
            return lo
    else:
        lo, hi = 0, b
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        raise IgdError("--batch-size auto: not even one image fits in the device's memory")
    return lo


def resolve_batch_size(spec: int | str, *, default: int, device: torch.device | str, cap: int,
                       try_batch: Callable[[int], Any], what: str, search: bool | None = None) -> int:
    """``spec`` as a number: itself; ``auto``: :func:`largest_batch` of ``try_batch`` on a CUDA device (capped at
    ``min(cap, MAX_AUTO_BATCH)``), the ``default`` elsewhere (both said in a note on stderr). ``search`` forces
    the search on or off (default: on CUDA only)."""
    spec = parse_batch_size(spec)
    if spec != "auto":
        return int(spec)
    dev = torch.device(device)
    if not (dev.type == "cuda" if search is None else search):
        err_console.print(f"note: --batch-size auto: nothing to search on {dev.type}; {what} uses the default "
                          f"{default}")
        return default
    limit = max(1, min(int(cap), MAX_AUTO_BATCH))
    b = largest_batch(try_batch, limit, start=min(default, limit))
    err_console.print(f"note: --batch-size auto: {b} images per batch fit for {what} (searched up to {limit})")
    return b


def _first(data: Any, b: int) -> Any:
    """The first ``b`` images of ``data`` as an image set of their own (the trial's batch)."""
    sub = copy.copy(data)
    sub.n = min(int(b), len(data))
    return sub


def rank_trial(req: Any, method: str) -> Callable[[int], Any]:
    """One batch of ``igd rank``'s workload: LO-IR on ``b`` probe images over one chunk of neurons (the most that
    is held at once: the same peak memory as the whole ranking at batch ``b``), CD-IR's activation pass on ``b``
    images (CLIP then encodes with the command's default batch), nothing for random."""
    per_example = 0

    def run(b: int) -> None:
        nonlocal per_example
        if method == "random":
            return
        sub = _first(req.data, b)
        if method == "cd-ir":
            from .ranking.cd_ir import activation_topk

            activation_topk(req.model, req.layer, sub, 1, b, show_progress=False, precision=req.precision)
            return
        from .ranking.lo_ir import DEFAULT_CHUNK_ELEMS, lo_ir

        a0, b0 = req.neurons
        per_example = per_example or _activation_elems(req)
        chunk = max(1, min(b0 - a0, DEFAULT_CHUNK_ELEMS // max(1, b * per_example)))  # as lo_ir chunks
        if req.exact_naive:  # the literal algorithm holds one forward at a time
            chunk = 1
        lo_ir(req.model, req.layer, sub, req.num_classes, neurons=(a0, a0 + chunk), batch_size=b,
              show_progress=False, precision=req.precision, path="naive" if req.exact_naive else req.lo_ir_path)
    return run


def _activation_elems(req: Any) -> int:
    """Elements of one image's output of the ranked layer."""
    from .layers import capture

    x = req.data.get(0, 1).x.to(module_device(req.model))
    with torch.no_grad(), capture(req.model, req.layer) as box:
        req.model(x)
    return int(box["out"][0].numel())


def defended_trial(model: nn.Module, data: Any, *, grad: bool, precision: str = "fp32") -> Callable[[int], Any]:
    """One batch of a defended (or base) model's workload on ``b`` images: the forward under ``precision`` (clean
    scoring, calibration), or with ``grad`` a forward and a backward to the input in fp32 (one attack step)."""
    def run(b: int) -> None:
        batch = data.get(0, min(int(b), len(data)))
        device = module_device(model)
        x, y = batch.x.to(device), batch.y.to(device)
        # a randomized model is queried for declared images (igd_cli.noise), on a stream of the trial's own
        with noise.images(noise.image_keys(batch.index, x), noise.stream(0, "batch-size-trial")):
            if grad:
                x.requires_grad_(True)
                try:
                    loss = F.cross_entropy(model(x), y)
                    if loss.requires_grad:  # a defence without a gradient: its attacks run no backward either
                        loss.backward()
                finally:  # the trial leaves no gradients behind (they would hold memory and leak into the next use)
                    for p in model.parameters():
                        p.grad = None
                return
            with torch.no_grad(), autocast(precision, device):
                model(memory_format(x, precision))
    return run


def calibration_trial(defense: Any, data: Any, precision: str = "fp32") -> Callable[[int], Any]:
    """One batch of ``igd calibrate-k``'s workload: the k-independent features with the base logits, then one
    masked tail, under ``precision``."""
    def run(b: int) -> None:
        batch = data.get(0, min(int(b), len(data)))
        device = module_device(defense.model)
        x = batch.x.to(device)
        with torch.no_grad(), autocast(precision, device), \
                noise.images(noise.image_keys(batch.index, x), noise.stream(0, "batch-size-trial")):
            feats = defense.features(memory_format(x, precision), with_base=True)
            defense.masked_tail(feats)
    return run


__all__ = ["MAX_AUTO_BATCH", "calibration_trial", "defended_trial", "is_oom", "largest_batch", "parse_batch_size",
           "rank_trial", "resolve_batch_size"]
