"""``--batch-size auto``: the largest batch of a stage's real workload that fits on the CUDA device, with headroom.

:func:`largest_batch` takes the workload as a callable ``try_batch(b)`` (run one batch of ``b`` images), doubles
``b`` until the trial fails to allocate or reaches the cap, then binary-searches between the last fit and the
first failure. A trial *fits* when it raised no allocation failure (:func:`is_oom`: ``torch.OutOfMemoryError`` and
the ``RuntimeError`` s cuBLAS, cuDNN and the CUDA runtime raise when they cannot allocate; every other error
propagates) and, on CUDA, when its peak reserved memory (fragmentation included) stays within
``1 - HEADROOM`` of the memory that was available when the search began: what the trial does not hold (other
processes, a later batch's fragmentation, a shape that allocates differently) has the rest. The trial workloads
(``*_trial``) are one batch of what the stage really runs, state included: an attack stage runs the real attacks
at a two-step budget on every image of the batch (:func:`attack_trial`). On a CPU there is nothing to search:
``auto`` is the command's default, and a note says so. The choice and its measured peak go into the result
(:class:`BatchChoice`).

Example::

    choice = choose_batch_size("auto", default=128, device=target.device, cap=len(data),
                               try_batch=rank_trial(req, "lo-ir"), what="LO-IR")
    result["batch_size"], result["auto_batch"] = choice.size, choice.to_json()
"""

from __future__ import annotations

import copy
import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn as nn

from .console import err_console
from .devices import module_device
from .errors import IgdError
from .precision import autocast, memory_format

#: the largest batch ``auto`` tries (and never more than the stage's images)
MAX_AUTO_BATCH = 4096
#: the fraction of the memory available at the start of the search that the chosen batch's trial leaves free
HEADROOM = 0.15
#: what cuBLAS, cuDNN and the CUDA runtime put in the ``RuntimeError`` they raise when an allocation fails (torch
#: raises ``torch.OutOfMemoryError`` only for its own caching allocator); matched exactly, nothing broader
ALLOCATION_FAILURES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDA error: out of memory")


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
    """An allocation failure on the accelerator: ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``), or a
    ``RuntimeError`` whose message names one of :data:`ALLOCATION_FAILURES`."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in ALLOCATION_FAILURES)


def _free() -> None:
    """Give the failed trial's memory back: break reference cycles, then return cached blocks to the device. Called
    after the ``except`` block has ended, so the traceback (and the trial's frames and tensors) are gone."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryProbe(Protocol):
    """How much memory a trial took and how much it may take (bytes)."""

    budget: int

    def start(self) -> None: ...

    def peak(self) -> int: ...


class CudaMemory:
    """Peak reserved memory of a trial on a CUDA device (``torch.cuda.max_memory_reserved``: fragmentation
    included); the budget is ``1 - headroom`` of what was available when the search began (free memory plus what
    torch's allocator already holds)."""

    def __init__(self, device: torch.device, headroom: float = HEADROOM):
        self.device = device
        _free()
        free, total = torch.cuda.mem_get_info(device)
        self.available = int(free) + int(torch.cuda.memory_reserved(device))
        self.total = int(total)
        self.budget = int((1 - headroom) * self.available)

    def start(self) -> None:
        _free()
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_reserved(self.device))


@dataclass
class Search:
    """What :func:`largest_batch` tried: batch -> peak bytes (None: no memory probe), and the sizes that failed
    (allocation failure, or a peak over the budget)."""

    peaks: dict[int, int | None] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)


def largest_batch(try_batch: Callable[[int], Any], cap: int, start: int = 1, memory: MemoryProbe | None = None,
                  search: Search | None = None) -> int:
    """The largest ``b`` in ``[1, cap]`` whose trial fits (memory grows with ``b``): doubling from ``start``, then
    binary search. A trial fits when ``try_batch(b)`` raises no allocation failure (:func:`is_oom`) and, with
    ``memory``, its peak is within ``memory.budget``; any other exception propagates. ``IgdError`` when not even
    1 fits. ``search`` collects what was tried."""
    if cap < 1:
        raise ValueError(f"cap {cap}: must be at least 1")
    search = search if search is not None else Search()

    def fits(b: int) -> bool:
        if memory is not None:
            memory.start()
        failed = False
        try:
            try_batch(b)
        except Exception as exc:  # noqa: BLE001 - only an allocation failure is a verdict; the rest is re-raised
            if not is_oom(exc):
                raise
            failed = True
        # here, after the except block, the exception and its traceback (which holds the trial's frames and so
        # its tensors) are released: only now can the memory go back
        peak = memory.peak() if memory is not None and not failed else None
        _free()
        ok = not failed and (peak is None or peak <= memory.budget)
        search.peaks[b] = peak
        if not ok:
            search.failed.append(b)
        return ok

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
        raise IgdError("--batch-size auto: not even one image of this stage's workload fits in the device's memory")
    return lo


@dataclass
class BatchChoice:
    """The batch a stage uses; for ``auto``, how it was chosen (recorded in results as ``auto_batch``)."""

    size: int
    auto: bool = False
    searched: bool = False  # False for auto on a CPU: the command's default
    what: str = ""
    cap: int | None = None
    peak_mb: float | None = None  # the chosen batch's trial: peak reserved memory (CUDA)
    available_mb: float | None = None  # free + torch's reserved memory when the search began (CUDA)
    budget_mb: float | None = None  # (1 - HEADROOM) of it
    device_total_mb: float | None = None
    tried: dict[int, float | None] = field(default_factory=dict)  # batch -> peak MiB (None: no probe / failed)
    failed: list[int] = field(default_factory=list)

    @property
    def headroom(self) -> float | None:
        """The fraction of the available memory the chosen batch's trial left free."""
        if self.peak_mb is None or not self.available_mb:
            return None
        return 1 - self.peak_mb / self.available_mb

    def to_json(self) -> dict[str, Any] | None:
        """None for a fixed ``--batch-size``; else the choice, its peak, the headroom and what was tried."""
        if not self.auto:
            return None
        h = self.headroom
        return {"batch_size": self.size, "searched": self.searched, "workload": self.what, "cap": self.cap,
                "peak_mb": self.peak_mb, "available_mb": self.available_mb, "budget_mb": self.budget_mb,
                "device_total_mb": self.device_total_mb, "headroom": None if h is None else round(h, 4),
                "headroom_kept": HEADROOM, "tried": {str(k): v for k, v in sorted(self.tried.items())},
                "failed": sorted(self.failed)}


def _mb(b: int | float | None) -> float | None:
    return None if b is None else round(b / 2 ** 20, 1)


def searchable(device: torch.device) -> bool:
    """Whether ``auto`` searches on ``device``: on CUDA only (a CPU has no memory wall to find)."""
    return device.type == "cuda"


def choose_batch_size(spec: int | str, *, default: int, device: torch.device | str, cap: int,
                      try_batch: Callable[[int], Any] | None, what: str, search: bool | None = None,
                      memory: MemoryProbe | None = None) -> BatchChoice:
    """``spec`` as a number: itself; ``auto``: :func:`largest_batch` of ``try_batch`` on a CUDA device (capped at
    ``min(cap, MAX_AUTO_BATCH)``, within :data:`HEADROOM`), the ``default`` elsewhere (both said in a note on
    stderr). ``search`` forces the search on or off (default: on CUDA only); ``memory`` replaces the CUDA probe.
    ``try_batch`` may be None where ``spec`` is a number (it is never run then)."""
    spec = parse_batch_size(spec)
    if spec != "auto":
        return BatchChoice(int(spec))
    dev = torch.device(device)
    if not (searchable(dev) if search is None else search):
        err_console.print(f"note: --batch-size auto: nothing to search on {dev.type}: the default batch, {default}, "
                          f"for {what}")
        return BatchChoice(default, auto=True, what=what)
    if try_batch is None:
        raise ValueError("--batch-size auto needs the stage's trial workload")
    limit = max(1, min(int(cap), MAX_AUTO_BATCH))
    if memory is None and dev.type == "cuda":
        memory = CudaMemory(dev)
    tried = Search()
    b = largest_batch(try_batch, limit, start=min(default, limit), memory=memory, search=tried)
    cuda = isinstance(memory, CudaMemory)
    choice = BatchChoice(b, auto=True, searched=True, what=what, cap=limit, peak_mb=_mb(tried.peaks.get(b)),
                         available_mb=_mb(getattr(memory, "available", None)),
                         budget_mb=_mb(memory.budget) if memory is not None else None,
                         device_total_mb=_mb(memory.total) if cuda else None,
                         tried={k: _mb(v) for k, v in tried.peaks.items()}, failed=tried.failed)
    peak = f", peak {choice.peak_mb:.0f} MiB of {choice.available_mb:.0f} MiB available" \
        if choice.peak_mb is not None and choice.available_mb else ""
    err_console.print(f"note: --batch-size auto: {b} images per batch fit for {what} (searched up to {limit}"
                      f"{peak}, {HEADROOM:.0%} kept free)")
    return choice


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


def _trial_block(x: torch.Tensor) -> Any:
    """The noise block of a trial's query of a randomized model (its draws are thrown away with the trial)."""
    from . import noise

    return noise.images(noise.image_keys(None, x), noise.stream(0, "batch-size trial"))


def defended_trial(model: nn.Module, data: Any, precision: str = "fp32") -> Callable[[int], Any]:
    """One batch of a defended (or base) model's scoring workload on ``b`` images: the forward under ``precision``
    (clean scoring; attack stages use :func:`attack_trial`)."""
    def run(b: int) -> None:
        batch = data.get(0, min(int(b), len(data)))
        device = module_device(model)
        x = batch.x.to(device)
        with torch.no_grad(), autocast(precision, device), _trial_block(x):
            model(memory_format(x, precision))
    return run


def calibration_trial(defense: Any, data: Any, precision: str = "fp32") -> Callable[[int], Any]:
    """One batch of ``igd calibrate-k``'s workload: the k-independent features with the base logits, then one
    masked tail, under ``precision``."""
    def run(b: int) -> None:
        batch = data.get(0, min(int(b), len(data)))
        device = module_device(defense.model)
        x = batch.x.to(device)
        with torch.no_grad(), autocast(precision, device), _trial_block(x):
            feats = defense.features(memory_format(x, precision), with_base=True)
            defense.masked_tail(feats)
    return run


#: the attacks an attack stage runs, by ``--attack`` name, as the trial runs them: composed attacks by their parts
#: (AutoAttack stops attacking an image once one part breaks it, so the composition would hold less than its
#: heaviest part does on a robust model), ``iw-wc`` by every attack it runs on either model
ATTACK_PARTS: dict[str, tuple[str, ...]] = {
    "aa": ("apgd-ce", "apgd-t-dlr", "fab-t", "square"),
    "aa-rand": ("apgd-ce", "apgd-eot"),
    "iw-wc": ("apgd-ce", "apgd-cw", "apgd-t-dlr", "fab-t", "square", "rays", "apgd-eot", "adaptive"),
}
#: the trial's budget: every attack allocates its whole state before its first step, so two steps (queries) hold
#: what a hundred do; EoT samples are taken one after another (pyautoattack), so one holds what twenty do
TRIAL_BUDGET = {"steps": 2, "restarts": 1, "queries": 2, "eot_iter": 1}


def attack_parts(attack: str) -> tuple[str, ...]:
    """The attacks :func:`attack_trial` runs for ``--attack attack``."""
    return ATTACK_PARTS.get(attack, (attack,))


def attack_trial(models: Sequence[nn.Module], data: Any, attack: str, *, eps: float, norm: str = "Linf",
                 num_classes: int | None = None, seed: int = 0) -> Callable[[int], Any]:
    """One batch of an attack stage's workload on ``b`` images: each attack of :func:`attack_parts` run for real,
    at :data:`TRIAL_BUDGET`, on each of ``models`` (the defended and the base model IW-WC attacks). Every image is
    labelled with the model's own prediction, so that every attack attacks every image of the batch (they skip
    images already misclassified): the trial holds the attack state of a whole batch of robust images."""
    from . import contract
    from .attacks import attack_class, make_attack

    parts = [name for name in attack_parts(attack) if norm in attack_class(name).norms]

    def run(b: int) -> None:
        batch = data.get(0, min(int(b), len(data)))
        index = torch.arange(len(batch.x), dtype=torch.int64)
        for model in models:
            device = module_device(model)
            x = batch.x.to(device)
            with torch.no_grad(), _trial_block(x):
                y = model(x).argmax(1)
            for name in parts:
                if name == "adaptive" and not contract.adaptive_column(model):
                    continue  # the adaptive attack runs on the defended model only
                atk = make_attack(name, model, eps=eps, norm=norm, seed=seed, num_classes=num_classes,
                                  strict=False, **TRIAL_BUDGET)
                try:
                    atk(x, y, index)
                except contract.NoGradient:  # a defence without a gradient: the evaluation leaves this attack out
                    continue
            for p in model.parameters():  # no gradients left behind (they would hold memory)
                p.grad = None
    return run


__all__ = ["ALLOCATION_FAILURES", "ATTACK_PARTS", "HEADROOM", "MAX_AUTO_BATCH", "BatchChoice", "CudaMemory", "Search",
           "attack_parts", "attack_trial", "calibration_trial", "choose_batch_size", "defended_trial", "is_oom",
           "largest_batch", "parse_batch_size", "rank_trial"]
