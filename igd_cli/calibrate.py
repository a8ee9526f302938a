"""Choosing k (``METHOD.md``, "Choosing k"): binary search for the smallest k whose defended clean accuracy is
within ``tolerance`` percentage points of the base model's, on cached k-independent features.

The smoothing pass (``ŷ``) and the clean layer output ``A(x)`` do not depend on k, so they are computed once per
batch and each candidate k only runs the tail ``h(A(x) ⊙ m_k ŷ)``. Features are cached on the model's device up to
``max_cache_bytes``; batches beyond that are recomputed for every candidate (each image's noise is keyed by the
image and the query's ordinal, :mod:`igd_cli.noise`, so a recomputed batch draws the same noise), so the result
is identical either way, only slower.

Noise: calibration draws each image's first query on the scoring stream of seed ``s XOR CALIBRATION_STREAM`` for a
defence seeded ``s``. ``defend-eval`` with seed ``s`` scores on the scoring stream of ``s`` and attacks query
streams of their own, so k is never chosen on a draw the evaluation reports (choosing it on the evaluation's draw 0
would select for that draw's luck). The figures stay reproducible: ``defend-eval --protocol single-draw --seed
(s XOR CALIBRATION_STREAM)`` gives calibrate-k's clean accuracy exactly.

Several layers (one importance matrix each): by default every layer keeps the same fraction of its neurons,
``k_l = ⌈k · N_l / N⌉`` with ``N`` the widest searched layer, and the binary search runs over that shared ``k``;
``--k LAYER=K`` fixes a layer's k (:class:`KSchedule`). The cached features are those of the first masked layer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import noise
from .artifacts import Artifact, load_artifact
from .console import progress
from .data import ImageSet
from .defense import Features, IGDefense, artifact_layer, check_importance, check_layers, importance_ranks
from .devices import module_device
from .errors import IgdError
from .layers import layer_output_shape, resolve_layer
from .common import DEFAULT_N_EXAMPLES  # noqa: F401  (importable from here as before)
from .precision import autocast, memory_format, precision_meta

DEFAULT_CACHE_BYTES = 2 << 30
#: calibrate-k scores on the scoring stream of ``seed XOR`` this: independent of the evaluation's draws (the scoring
#: stream of ``seed``) and of the attacks' (streams of their own), so k is not picked on a draw that is then reported
CALIBRATION_STREAM = 0x6C8E9CF5


def calibration_stream(seed: int) -> int:
    """The seed whose scoring stream calibrate-k draws on for a defence whose evaluations use ``seed``.

    >>> calibration_stream(0) == CALIBRATION_STREAM
    True
    """
    return int(seed) ^ CALIBRATION_STREAM


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


@dataclass(frozen=True)
class KSchedule:
    """Every masked layer's k from the one k the search varies: layers in ``fixed`` keep their k, the others keep
    the same fraction ``k / n`` of their neurons, rounded up (so k = n keeps them whole), where ``n`` is the width
    of the ``reference`` layer, the widest searched one. One layer: ``ks(k) == {layer: k}``.

    >>> KSchedule({"layer3": 256, "layer4": 512}, {}).ks(100)
    {'layer3': 50, 'layer4': 100}
    """

    sizes: dict[str, int]  # layer -> N_l, in the defence's layer order
    fixed: dict[str, int] = field(default_factory=dict)

    @property
    def searched(self) -> bool:
        return any(layer not in self.fixed for layer in self.sizes)

    @property
    def reference(self) -> str:
        """The layer whose k is the search variable (the widest searched one; all fixed: the widest)."""
        free = [layer for layer in self.sizes if layer not in self.fixed] or list(self.sizes)
        return max(free, key=lambda layer: self.sizes[layer])

    @property
    def n(self) -> int:
        return self.sizes[self.reference]

    def ks(self, k: int) -> dict[str, int]:
        return {layer: self.fixed.get(layer, -(-k * size // self.n)) for layer, size in self.sizes.items()}


@dataclass
class Calibration:
    """The result of :func:`calibrate_k`; accuracies are fractions, the curve is sorted by k (the search variable:
    the k of ``schedule.reference``; one layer: its k).

    Example::

        cal = calibrate_k(defense, importance, images)
        cal.k, cal.accuracy, cal.base_accuracy, cal.curve       # [[k, accuracy], ...] of every k evaluated
    """

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
    schedule: KSchedule | None = None

    @property
    def ks(self) -> dict[str, int]:
        """Every layer's k at the result."""
        return self.schedule.ks(self.k) if self.schedule is not None else {}

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
    """k-independent features per batch: cached, or recomputed (the same noise: it is keyed by the images)."""

    def __init__(self, defense: IGDefense, data: ImageSet, batch_size: int, max_cache_bytes: int, noise_seed: int,
                 precision: str = "fp32"):
        from .scoring import score_stream

        self.defense, self.data, self.batch_size, self.precision = defense, data, batch_size, precision
        self.device = module_device(defense.model)
        self.stream = score_stream(noise_seed)
        self.entries: list[tuple[int, int, torch.Tensor, torch.Tensor, Features | None]] = []
        base_correct = torch.zeros((), dtype=torch.int64, device=self.device)  # summed on the device
        self.cached_bytes = 0
        self.recomputed = 0
        with progress() as bar:
            task = bar.add_task("features (pass 1)", total=len(data))
            for batch in data.batches(batch_size):
                start, stop = int(batch.index[0]), int(batch.index[-1]) + 1
                x, y = memory_format(batch.x.to(self.device), precision), batch.y.to(self.device)
                keys = noise.image_keys(batch.index, x)
                with noise.images(keys, self.stream):
                    feats = defense.features(x, with_base=True)
                base_correct += (feats.base_logits.argmax(1) == y).sum()
                feats.base_logits = None
                keep = self.cached_bytes + feats.nbytes() <= max_cache_bytes
                if keep:
                    self.cached_bytes += feats.nbytes()
                self.entries.append((start, stop, y, keys, feats if keep else None))
                bar.advance(task, len(y))
        self.base_correct = int(base_correct)  # one transfer after the pass

    def __iter__(self):
        for start, stop, y, keys, feats in self.entries:
            if feats is None:
                with noise.images(keys, self.stream):
                    feats = self.defense.features(memory_format(self.data.get(start, stop).x.to(self.device),
                                                                self.precision))
                self.recomputed += 1
            yield y, feats


@torch.no_grad()
def calibrate_k(defense: IGDefense, importance: torch.Tensor | Sequence[torch.Tensor], data: ImageSet, *,
                tolerance: float = 0.5, batch_size: int = 256, k: int | Mapping[str, int] | None = None,
                max_cache_bytes: int = DEFAULT_CACHE_BYTES, precision: str = "fp32") -> Calibration:
    """Binary search over k ∈ [1, N] for the smallest k whose defended clean accuracy passes.

    Invariant: the upper end passes (k = N keeps every neuron, so ``s = Σ_c ŷ_c = 1`` and the defence is the base
    model), and every k below the lower end was seen to fail; the result passes and k − 1 fails (or k = 1). Clean
    accuracy is not always monotone in k, so this is the boundary the search found, not necessarily the global
    smallest passing k. With ``k`` given, only that k is evaluated.

    Several layers: ``importance`` holds one matrix per ``defense.layers`` entry, ``k`` maps layers to fixed k's,
    and the search runs over the shared fraction (:class:`KSchedule`); with fixed layers the upper end need not
    pass, and then the result is the upper end (check ``passes``).

    The smoothing noise is each image's first draw on the scoring stream of ``calibration_stream(s)``, ``s`` the
    defence's seed (none of the draws an evaluation with seed ``s`` reports).
    ``precision``: every forward under autocast (:mod:`igd_cli.precision`).

    Example::

        whole = IGDefense(model, "block3", torch.ones(128, 10), sigma=0.1)    # the masks are set per k tried
        cal = calibrate_k(whole, importance, images, tolerance=0.5)
        defense = IGDefense(model, "block3", topk_mask(importance, cal.k), sigma=0.1)
    """
    if tolerance < 0:
        raise IgdError(f"--tolerance {tolerance}: must be >= 0 percentage points")
    t0 = time.perf_counter()
    imps = [importance] if isinstance(importance, torch.Tensor) else list(importance)
    if len(imps) != len(defense.layers):
        raise ValueError(f"{len(imps)} importance matrices for {len(defense.layers)} layers")
    sizes = {layer: int(imp.shape[0]) for layer, imp in zip(defense.layers, imps)}
    if isinstance(k, int):
        if len(sizes) != 1:
            raise IgdError(f"--k {k}: with several layers give LAYER=K")
        k = {defense.layers[0]: k}
    fixed = dict(k or {})
    for layer, kk in fixed.items():
        if layer not in sizes:
            raise IgdError(f"--k {layer}={kk}: {layer} is not one of the masked layers ({', '.join(sizes)})")
        if not 1 <= kk <= sizes[layer]:
            raise IgdError(f"--k {kk}: must be between 1 and N = {sizes[layer]} (the masked layer's neuron count)"
                           + (f" of {layer}" if len(sizes) > 1 else ""))
    schedule = KSchedule(sizes, fixed)
    n_neurons = schedule.n
    device = module_device(defense.model)
    ranks = [importance_ranks(imp).to(device) for imp in imps]
    noise_seed = calibration_stream(defense.seed)
    with autocast(precision, device):
        store = _FeatureStore(defense, data, batch_size, max_cache_bytes, noise_seed, precision)
        result_k, correct, order = _search(defense, ranks, schedule, fixed, store, len(data), tolerance)
    info = {"cached_bytes": store.cached_bytes, "recomputed_batches": store.recomputed,
            "batches": len(store.entries), "fast_tail": defense.split.fast, "noise_seed": noise_seed}
    return Calibration(result_k, n_neurons, len(data), float(tolerance), store.base_correct, correct, order,
                       schedule.searched, time.perf_counter() - t0, info, schedule)


def _search(defense: IGDefense, ranks: list[torch.Tensor], schedule: KSchedule, fixed: dict[str, int],
            store: _FeatureStore, n: int, tolerance: float) -> tuple[int, dict[int, int], list[int]]:
    """The binary search of :func:`calibrate_k` on the stored features: (k, correct counts, evaluation order)."""
    n_neurons = schedule.n
    correct: dict[int, int] = {}
    order: list[int] = []

    def evaluate(kk: int) -> int:
        if kk not in correct:
            masks = [(r < kl).float() for r, kl in zip(ranks, schedule.ks(kk).values())]
            total = torch.zeros((), dtype=torch.int64, device=store.device)  # summed on the device
            for y, feats in store:
                total += (defense.masked_tail(feats, masks).argmax(1) == y).sum()
            correct[kk] = int(total)  # one transfer per k
            order.append(kk)
        return correct[kk]

    def ok(kk: int) -> bool:
        return passes(evaluate(kk), store.base_correct, n, tolerance)

    if not schedule.searched:
        result_k = fixed[schedule.reference]
        evaluate(result_k)
    else:
        steps = 1 + math.ceil(math.log2(n_neurons)) if n_neurons > 1 else 1
        with progress() as bar:
            task = bar.add_task("binary search over k", total=steps)
            lo, hi = 1, n_neurons
            if not ok(hi):  # one layer: beyond float rounding impossible, k = N is the base model (s = 1)
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
    return result_k, correct, order


def parse_k(values: Sequence[str] | None) -> int | dict[str, int] | None:
    """``--k``: one ``K`` (one masked layer) or ``LAYER=K`` per layer to fix, e.g. ``["layer3=64"]``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return _int_k(values[0], values[0])
    out: dict[str, int] = {}
    for v in values:
        layer, sep, kk = v.partition("=")
        if not sep or not layer.strip():
            raise IgdError(f"--k {v}: expected LAYER=K (or one K for a single masked layer)")
        if layer.strip() in out:
            raise IgdError(f"--k {v}: layer {layer.strip()} given twice")
        out[layer.strip()] = _int_k(kk, v)
    return out


def _int_k(text: str, given: str) -> int:
    try:
        return int(text.strip())
    except ValueError as exc:
        raise IgdError(f"--k {given}: k must be a whole number") from exc


#: calibrate-k's default --batch-size (every command's: results do not depend on it, docs/same-answer.md)
CALIBRATION_BATCH = 128


def run_calibration(target: Any, importance_path: str | Path | Sequence[str | Path], out: str | Path, *,
                    layer: str | None = None, split: str = "test", n_examples: int | None = None,
                    tolerance: float = 0.5, eps: float | None = None, sigma: float | None = None, n_smooth: int = 1,
                    tau: float = 0.01, rs: bool = True, k: int | Mapping[str, int] | None = None,
                    batch_size: int | str = 256, seed: int = 0, cache_bytes: int = DEFAULT_CACHE_BYTES,
                    data_dir: str | Path | None = None, plot: str | Path | None = None,
                    extra_meta: dict[str, Any] | None = None, precision: str = "fp32",
                    auto_default: int = CALIBRATION_BATCH, start: int = 0,
                    data: ImageSet | None = None) -> dict[str, Any]:
    """``igd calibrate-k`` as a library call: choose k on ``n_examples`` images of the split from position ``start``
    (default: the first 1000, or the whole split when smaller; ``start`` > 0 holds the first ones out, e.g. the
    images an evaluation reports on), write the mask artifact (and the plot) and return the result dictionary.
    ``data``: calibrate on these images instead (a held-out part of another split).

    Several importance files (a list, one per layer) give one mask artifact masking all their layers; ``k`` is
    then a mapping of the layers whose k is fixed, and the result's ``k`` and ``n_neurons`` are keyed by layer.
    ``batch_size`` may be ``"auto"`` (:mod:`igd_cli.batching`); ``precision``: the defended forwards under
    autocast, recorded in the mask's calibration (it can change k). ``auto_default``: what ``auto`` is on a CPU.

    Example::

        r = run_calibration(target, "imp.safetensors", "mask.safetensors", n_examples=200, tolerance=0.5)
        r["k"], r["clean_accuracy"], r["base_clean_accuracy"]
    """
    from .batching import calibration_trial, choose_batch_size
    from .common import FOR_SMOOTHING, check_classes
    from .defense import check_settings, save_mask, topk_mask
    from .report import plot_calibration

    if tolerance < 0:
        raise IgdError(f"--tolerance {tolerance}: must be >= 0 percentage points")
    paths = [importance_path] if isinstance(importance_path, (str, Path)) else list(importance_path)
    if not paths:
        raise IgdError("--importance: give at least one importance artifact")
    if len(paths) > 1 and layer is not None:
        raise IgdError("--layer: with several --importance files, the layers are those the files were made for")
    eps_value = eps
    if rs and sigma is None:
        eps_value = eps_value if eps_value is not None else target.default_eps(FOR_SMOOTHING)
        sigma = eps_value / 2
    check_settings(tau=tau, sigma=sigma, n_smooth=n_smooth, rs=rs)
    if data is None:
        data = calibration_images(target, split, start, n_examples, data_dir)
    check_classes(target, data)
    input_shape = tuple(data.get(0, 1).x.shape[1:])
    arts, layers, imps = zip(*[load_importance(p, target, layer, input_shape) for p in paths])
    layers = list(check_layers(target.model, layers))
    if isinstance(k, Mapping):
        k = {_resolve_k_layer(target.model, name, layers): v for name, v in k.items()}

    one = len(layers) == 1
    full = [torch.ones(imp.shape[0], target.loaded.num_classes, device=target.device) for imp in imps]
    defense = IGDefense(target.model, layers, full, tau=tau, sigma=sigma, n_smooth=n_smooth, rs=rs, seed=seed)
    choice = choose_batch_size(batch_size, default=auto_default, device=target.device, cap=len(data),
                               try_batch=calibration_trial(defense, data, precision), what="calibrate-k")
    batch_size = choice.size
    cal = calibrate_k(defense, list(imps), data, tolerance=tolerance, batch_size=batch_size, k=k,
                      max_cache_bytes=cache_bytes, precision=precision)
    ks = cal.ks
    masks = [topk_mask(imp, ks[name]) for name, imp in zip(layers, imps)]
    settings = {**defense.settings(), "eps": eps_value}
    curve_k = [[cal.schedule.ks(kk), acc] for kk, acc in cal.curve]
    calibration = {"tolerance": tolerance, "n_examples": cal.n_examples, "split": split, "seed": seed,
                   "noise_seed": cal.info["noise_seed"] if rs else None,
                   "batch_size": batch_size, "base_clean_accuracy": cal.base_accuracy,
                   "clean_accuracy": cal.accuracy, "curve": cal.curve, "searched": cal.searched,
                   "data": image_range(data), "data_id": data.identity(),
                   **precision_meta(precision)}
    search = {} if one else {"k_search": cal.k, "search_layer": cal.schedule.reference, "n_search": cal.n_neurons,
                             "fraction": cal.k / cal.n_neurons, "fixed_k": dict(cal.schedule.fixed),
                             "curve_k": curve_k, "passes": cal.passes(cal.k)}
    calibration.update(search)
    save_mask(out, target, layers, masks, k=[ks[name] for name in layers], importance_path=paths,
              importance_meta=[a.meta for a in arts], defense=settings,
              extra={"calibration": calibration, "seconds": cal.seconds, **(extra_meta or {})})
    sizes = {name: int(imp.shape[0]) for name, imp in zip(layers, imps)}
    result = {"k": cal.k if one else ks, "base_clean_accuracy": cal.base_accuracy, "clean_accuracy": cal.accuracy,
              "curve": cal.curve, "out": str(out), "seconds": cal.seconds,
              "n_neurons": cal.n_neurons if one else sizes, "n_examples": cal.n_examples, "tolerance": tolerance,
              "images": calibration["data"],
              "layer": defense.layer, "layers": layers, "searched": cal.searched, "order": cal.order,
              "defense": settings, **search, **cal.info, "noise_seed": calibration["noise_seed"],
              "batch_size": batch_size, "auto_batch": choice.to_json(), "precision": precision, **target.record()}
    if plot is not None:
        methods = "+".join(dict.fromkeys(str(a.meta.get("method", "?")) for a in arts))
        xlabel = None if one else (f"k at {cal.schedule.reference} (of N = {cal.n_neurons}; every searched layer "
                                   f"keeps the same fraction k/N)")
        plot_calibration(plot, cal.curve, cal.base_accuracy, tolerance, cal.k, cal.n_neurons,
                         title=f"{target.loaded.name.split('/')[-1]} · {defense.layer} · {methods} "
                               f"· {cal.n_examples} images", xlabel=xlabel)
        result["plot"] = str(plot)
    return result


def calibration_images(target: Any, split: str, start: int, n: int | None,
                       data_dir: str | Path | None = None) -> ImageSet:
    """Images ``start`` .. ``start + n - 1`` of the split (``n`` None: up to the first 1000 from ``start``), or a
    one-line error naming the split's size."""
    if start < 0:
        raise IgdError(f"--start {start}: must be >= 0")
    whole = target.data(split, None, data_dir)
    if start >= len(whole):
        raise IgdError(f"--start {start}: the {split} split has {len(whole)} images")
    n = min(DEFAULT_N_EXAMPLES, len(whole) - start) if n is None else int(n)
    if n < 1 or start + n > len(whole):
        raise IgdError(f"--n-examples {n} from --start {start}: the {split} split has {len(whole)} images, "
                       f"{len(whole) - start} from there: give fewer than {len(whole) - start + 1}")
    data = target.data(split, start + n, data_dir)
    return data.view(start, start + n) if start else data


def image_range(data: ImageSet) -> dict[str, Any]:
    """Which images a set is: data set, split, first position and count (what results files and tables say)."""
    return {"dataset": data.name, "split": data.split, "start": int(getattr(data, "start", 0)), "n": len(data)}


def _resolve_k_layer(model: Any, name: str, layers: list[str]) -> str:
    """The masked layer a ``--k LAYER=K`` names (full name or unique suffix, like ``--layer``)."""
    try:
        full = resolve_layer(model, name)
    except IgdError as exc:
        raise IgdError(f"--k {name}=...: no such layer among the masked ones ({', '.join(layers)})") from exc
    if full not in layers:
        raise IgdError(f"--k {name}=...: {full} is not one of the masked layers ({', '.join(layers)})")
    return full
