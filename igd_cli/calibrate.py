"""Choosing k (``METHOD.md``, "Choosing k"): binary search for the smallest k whose defended clean accuracy is
within ``tolerance`` percentage points of the base model's, on cached k-independent features.

The smoothing pass (``ŷ``) and the clean layer output ``A(x)`` do not depend on k, so they are computed once per
batch (with the defence's seeded noise: each image's first draw after ``reseed``, which ``defend-eval`` scores as
draw 0 and ``--protocol single-draw`` alone) and each candidate k only runs the tail ``h(A(x) ⊙ m_k ŷ)``. Features
are cached on the model's device up to ``max_cache_bytes``; batches beyond that are recomputed for every candidate
from the saved noise state, so the result is identical either way, only slower.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifacts import Artifact, load_artifact
from .console import progress
from .data import ImageSet
from .defense import Features, IGDefense, artifact_layer, check_importance, importance_ranks
from .devices import module_device
from .errors import IgdError
from .layers import layer_output_shape, resolve_layer

DEFAULT_CACHE_BYTES = 2 << 30


def load_importance(path: str | Path, target: Any, layer: str | None, input_shape: tuple[int, ...]
                    ) -> tuple[Artifact, str, torch.Tensor]:
    """Read an importance artifact made for this model (and ``layer`` if given); returns (artifact, layer, I)."""
    art = load_artifact(path, kind="importance", fingerprint=target.loaded.fingerprint)
    if layer is not None and not isinstance(art.meta.get("layer"), str):
        raise IgdError(f"{path}: importance artifact has no layer in its metadata")
    if layer is not None and resolve_layer(target.model, layer) != art.meta["layer"]:
        raise IgdError(f"{path}: made for layer {art.meta['layer']!r}, not {resolve_layer(target.model, layer)!r}")
    have = artifact_layer(art, target.model)
    imp = check_importance(art["importance"].float(), where=str(path))
    n = layer_output_shape(target.model, have, input_shape)[0]
    if tuple(imp.shape) != (n, target.loaded.num_classes):
        raise IgdError(f"{path}: importance shape {list(imp.shape)} does not match layer {have} "
                       f"(N = {n}) and {target.loaded.num_classes} classes")
    return art, have, imp


def passes(correct: int, base_correct: int, n: int, tolerance: float) -> bool:
    """Defended accuracy ≥ base accuracy − tolerance points, compared on counts (no float rounding at the edge)."""
    return 100 * (base_correct - correct) <= tolerance * n + 1e-9


@dataclass
class Calibration:
    """The result of :func:`calibrate_k`; accuracies are fractions, the curve is sorted by k."""

    k: int
    n_neurons: int
    n_examples: int
    tolerance: float
    base_correct: int
    correct: dict[int, int]  # k -> number of correct defended predictions, every k evaluated
    order: list[int]  # the k's in the order the search evaluated them
    searched: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def base_accuracy(self) -> float:
        return self.base_correct / self.n_examples

    @property
    def accuracy(self) -> float:
        return self.correct[self.k] / self.n_examples

    @property
    def curve(self) -> list[list[float]]:
        return [[k, c / self.n_examples] for k, c in sorted(self.correct.items())]

    def passes(self, k: int) -> bool:
        return passes(self.correct[k], self.base_correct, self.n_examples, self.tolerance)


class _FeatureStore:
    """k-independent features per batch: cached, or recomputable from the saved noise state."""

    def __init__(self, defense: IGDefense, data: ImageSet, batch_size: int, max_cache_bytes: int):
        self.defense, self.data, self.batch_size = defense, data, batch_size
        self.device = module_device(defense.model)
        self.entries: list[tuple[int, int, torch.Tensor, Features | None, torch.Tensor | None]] = []
        self.base_correct = 0
        self.cached_bytes = 0
        self.recomputed = 0
        defense.reseed()
        with progress() as bar:
            task = bar.add_task("features (pass 1)", total=len(data))
            for batch in data.batches(batch_size):
                start, stop = int(batch.index[0]), int(batch.index[-1]) + 1
                x, y = batch.x.to(self.device), batch.y.to(self.device)
                state = defense.noise_state(x) if defense.rs else None
                feats = defense.features(x, with_base=True)
                self.base_correct += int((feats.base_logits.argmax(1) == y).sum())
                feats.base_logits = None
                keep = self.cached_bytes + feats.nbytes() <= max_cache_bytes
                if keep:
                    self.cached_bytes += feats.nbytes()
                self.entries.append((start, stop, y, feats if keep else None, state))
                bar.advance(task, len(y))

    def __iter__(self):
        for start, stop, y, feats, state in self.entries:
            if feats is None:
                if state is not None:
                    self.defense.set_noise_state(state)
                feats = self.defense.features(self.data.get(start, stop).x.to(self.device))
                self.recomputed += 1
            yield y, feats


@torch.no_grad()
def calibrate_k(defense: IGDefense, importance: torch.Tensor, data: ImageSet, *, tolerance: float = 0.5,
                batch_size: int = 256, k: int | None = None, max_cache_bytes: int = DEFAULT_CACHE_BYTES) -> Calibration:
    """Binary search over k ∈ [1, N] for the smallest k whose defended clean accuracy passes.

    Invariant: the upper end passes (k = N keeps every neuron, so ``s = Σ_c ŷ_c = 1`` and the defence is the base
    model), and every k below the lower end was seen to fail; the result passes and k − 1 fails (or k = 1). Clean
    accuracy is not always monotone in k, so this is the boundary the search found, not necessarily the global
    smallest passing k. With ``k`` given, only that k is evaluated.
    """
    if tolerance < 0:
        raise IgdError(f"--tolerance {tolerance}: must be >= 0 percentage points")
    t0 = time.perf_counter()
    n_neurons = importance.shape[0]
    if k is not None and not 1 <= k <= n_neurons:
        raise IgdError(f"--k {k}: must be between 1 and N = {n_neurons} (the masked layer's neuron count)")
    device = module_device(defense.model)
    ranks = importance_ranks(importance).to(device)
    store = _FeatureStore(defense, data, batch_size, max_cache_bytes)
    n = len(data)
    correct: dict[int, int] = {}
    order: list[int] = []

    def evaluate(kk: int) -> int:
        if kk not in correct:
            mask = (ranks < kk).float()
            total = 0
            for y, feats in store:
                total += int((defense.masked_tail(feats, mask).argmax(1) == y).sum())
            correct[kk] = total
            order.append(kk)
        return correct[kk]

    def ok(kk: int) -> bool:
        return passes(evaluate(kk), store.base_correct, n, tolerance)

    if k is not None:
        evaluate(k)
        result_k = k
    else:
        steps = 1 + math.ceil(math.log2(n_neurons)) if n_neurons > 1 else 1
        with progress() as bar:
            task = bar.add_task("binary search over k", total=steps)
            lo, hi = 1, n_neurons
            if not ok(hi):  # cannot happen beyond float rounding: k = N is the base model (s = 1)
                lo = hi
            bar.advance(task)
            while lo < hi:
                mid = (lo + hi) // 2
                if ok(mid):
                    hi = mid
                else:
                    lo = mid + 1
                bar.advance(task)
            bar.update(task, completed=steps)
        result_k = hi
    info = {"cached_bytes": store.cached_bytes, "recomputed_batches": store.recomputed,
            "batches": len(store.entries), "fast_tail": defense.split.fast}
    return Calibration(result_k, n_neurons, n, float(tolerance), store.base_correct, correct, order, k is None,
                       time.perf_counter() - t0, info)


DEFAULT_N_EXAMPLES = 1000


def run_calibration(target: Any, importance_path: str | Path, out: str | Path, *, layer: str | None = None,
                    split: str = "test", n_examples: int | None = None, tolerance: float = 0.5,
                    eps: float | None = None, sigma: float | None = None, n_smooth: int = 1, tau: float = 0.01,
                    rs: bool = True, k: int | None = None, batch_size: int = 256, seed: int = 0,
                    cache_bytes: int = DEFAULT_CACHE_BYTES, data_dir: str | Path | None = None,
                    plot: str | Path | None = None, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """``igd calibrate-k`` as a library call: choose k on the first ``n_examples`` images (default 1000, or the
    whole split when smaller), write the mask artifact (and the plot) and return the result dictionary."""
    from .common import FOR_SMOOTHING, check_classes
    from .defense import check_settings, save_mask, topk_mask
    from .report import plot_calibration

    if tolerance < 0:
        raise IgdError(f"--tolerance {tolerance}: must be >= 0 percentage points")
    eps_value = eps
    if rs and sigma is None:
        eps_value = eps_value if eps_value is not None else target.default_eps(FOR_SMOOTHING)
        sigma = eps_value / 2
    check_settings(tau=tau, sigma=sigma, n_smooth=n_smooth, rs=rs)
    data = target.data(split, n_examples, data_dir)  # checks 1 <= n_examples <= the split's size
    if n_examples is None:
        data.n = min(DEFAULT_N_EXAMPLES, len(data))
    check_classes(target, data)
    input_shape = tuple(data.get(0, 1).x.shape[1:])
    art, layer_name, imp = load_importance(importance_path, target, layer, input_shape)
    n_neurons = imp.shape[0]
    if k is not None and not 1 <= k <= n_neurons:
        raise IgdError(f"--k {k}: must be between 1 and N = {n_neurons} (the masked layer's neuron count)")

    full_mask = torch.ones(n_neurons, target.loaded.num_classes)
    defense = IGDefense(target.model, layer_name, full_mask.to(target.device), tau=tau, sigma=sigma,
                        n_smooth=n_smooth, rs=rs, seed=seed)
    cal = calibrate_k(defense, imp, data, tolerance=tolerance, batch_size=batch_size, k=k,
                      max_cache_bytes=cache_bytes)
    mask = topk_mask(imp, cal.k)
    settings = {**defense.settings(), "eps": eps_value}
    calibration = {"tolerance": tolerance, "n_examples": cal.n_examples, "split": split, "seed": seed,
                   "batch_size": batch_size, "base_clean_accuracy": cal.base_accuracy,
                   "clean_accuracy": cal.accuracy, "curve": cal.curve, "searched": cal.searched,
                   "data": {"dataset": data.name, "split": split, "n": cal.n_examples}}
    save_mask(out, target, layer_name, mask, k=cal.k, importance_path=importance_path, importance_meta=art.meta,
              defense=settings, extra={"calibration": calibration, "seconds": cal.seconds, **(extra_meta or {})})
    result = {"k": cal.k, "base_clean_accuracy": cal.base_accuracy, "clean_accuracy": cal.accuracy,
              "curve": cal.curve, "out": str(out), "seconds": cal.seconds,
              "n_neurons": n_neurons, "n_examples": cal.n_examples, "tolerance": tolerance, "layer": layer_name,
              "searched": cal.searched, "order": cal.order, "defense": settings, **cal.info}
    if plot is not None:
        plot_calibration(plot, cal.curve, cal.base_accuracy, tolerance, cal.k, n_neurons,
                         title=f"{target.loaded.name.split('/')[-1]} · {layer_name} · {art.meta.get('method', '?')} "
                               f"· {cal.n_examples} images")
        result["plot"] = str(plot)
    return result
