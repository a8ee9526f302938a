"""IG-Defense, steps 2-3 of ``METHOD.md``: the two-pass soft-masked forward around any base model.

``ŷ = softmax(mean_i f(x + v_i) / τ)`` with ``v_i ~ N(0, σ²I)`` (no clipping), ``s = m ŷ`` (B, N), and the
prediction is ``h(A(x) ⊙ s)``. Nothing is detached: gradients flow through both passes.

The network is split at the masked layer with :class:`igd_cli.layers.LayerSplit` (fx graph split; hook fallback
when the model does not trace), so any model with a named layer works: RobustBench, torchvision, files, demo.

Noise (:mod:`igd_cli.noise`): the ``n_s`` draws of a query are a pure function of (stream, the image's identity,
the ordinal of the query for that image), declared by whoever queries (scoring, attacks, calibrate-k). An image's
r-th query therefore gets the same noise in any batch, shard or order, on any device, whatever the last bits of
the queried point (so ``defend-eval`` and IW-WC with and without skipping agree image by image), and repeated
queries of one point (EoT) get fresh noise.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifacts import Artifact, file_sha256, load_artifact, save_artifact
from .devices import module_device, module_dtype
from .errors import IgdError
from .layers import LayerSplit, capture, fit_weights, resolve_layer, scale_output, scaled_layers
from .noise import FixedNoise, FreshNoise

if TYPE_CHECKING:  # pragma: no cover
    from .common import Target

DEFAULT_TAU = 0.01
DEFAULT_N_SMOOTH = 1


# --- masks ------------------------------------------------------------------------------------------

def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's values (as uint8 for a 0/1 mask): the identity of a mask that has no file."""
    return hashlib.sha256(t.detach().cpu().to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()


def mask_identity(mask: torch.Tensor | None, layer: str | None, settings: dict[str, Any], **extra: Any
                  ) -> dict[str, Any]:
    """What identifies a defended variant built in memory in its attack sets' metadata (as
    :func:`igd_cli.evaluate.defense_identity` does for a mask file)."""
    return json.loads(json.dumps({"mask_sha256": None if mask is None else tensor_sha256(mask), "layer": layer,
                                  "settings": settings, **extra}, sort_keys=True, default=str))


def check_importance(importance: torch.Tensor, where: str = "importance") -> torch.Tensor:
    """A finite float (N, C) matrix, or a one-line IgdError."""
    if importance.ndim != 2:
        raise IgdError(f"{where}: expected an (N, C) matrix, found shape {list(importance.shape)}")
    if not importance.is_floating_point():
        importance = importance.float()
    bad = ~torch.isfinite(importance)
    if bad.any():
        n_bad = int(bad.sum())
        raise IgdError(f"{where}: {n_bad} entr{'y is' if n_bad == 1 else 'ies are'} NaN or infinite")
    return importance


def importance_ranks(importance: torch.Tensor) -> torch.Tensor:
    """Rank (0 = most important) of every neuron within each class column, shape (N, C), int64.

    Ties are broken deterministically by the lower neuron index first (a stable descending sort), so the mask
    for any k is ``ranks < k`` and the masks are nested: the mask for k is contained in the mask for k + 1.
    """
    importance = check_importance(importance)
    order = torch.sort(importance, dim=0, descending=True, stable=True).indices  # (N, C): neuron at rank r
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[0], device=order.device).unsqueeze(1).expand_as(order)
    ranks.scatter_(0, order, positions)
    return ranks


def topk_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """The IG-Defense mask: column c keeps the k neurons with the largest ``importance[:, c]`` (uint8 0/1).

    Example::

        mask = topk_mask(importance, 16)                  # (N, C): 16 ones per column
        IGDefense(model, "block3", mask, sigma=0.1)
    """
    n = importance.shape[0]
    check_k(k, n)
    return (importance_ranks(importance) < k).to(torch.uint8)


def check_k(k: int, n: int) -> None:
    if not 1 <= int(k) <= n:
        raise IgdError(f"--k {k}: must be between 1 and N = {n} (the masked layer's neuron count)")


def check_settings(*, tau: float, sigma: float | None, n_smooth: int, rs: bool) -> None:
    """Refuse nonsensical defence settings with one line."""
    if not tau > 0:
        raise IgdError(f"--tau {tau}: must be > 0")
    if int(n_smooth) < 1:
        raise IgdError(f"--n-smooth {n_smooth}: must be at least 1")
    if sigma is not None and not sigma >= 0:
        raise IgdError(f"--sigma {sigma}: must be >= 0")
    if rs and sigma is None:
        raise IgdError("randomized smoothing needs σ: pass sigma (or eps, σ = ε/2) or turn smoothing off")


# --- the defended model -----------------------------------------------------------------------------

@dataclass
class Features:
    """What the defended forward needs that does not depend on the mask: ``A(x)``, the tail's context, ``ŷ``."""

    a: torch.Tensor  # (B, N, ...) clean layer output
    ctx: tuple  # what the tail needs besides A (skip connections, or (x,) for the hook fallback)
    yhat: torch.Tensor  # (B, C) soft pseudo-label
    base_logits: torch.Tensor | None = None  # f(x), when asked for (free without smoothing)

    def nbytes(self) -> int:
        tensors = [self.a, self.yhat, *[c for c in self.ctx if isinstance(c, torch.Tensor)]]
        if self.base_logits is not None:
            tensors.append(self.base_logits)
        return sum(t.numel() * t.element_size() for t in tensors)


class IGDefense(nn.Module):
    """A base model wrapped with IG-Defense's two-pass soft masking (``METHOD.md``, steps 2-3).

    ``mask`` is (N, C) 0/1 (uint8, bool or float). ``sigma`` defaults to ``eps / 2`` when ``eps`` is given.
    Several layers: ``layer`` a list and ``mask`` one (N_l, C) mask per layer; pass 2 then scales every listed layer
    by its own ``s_l = m_l ŷ`` with the same ``ŷ`` (the fx split at the first of them, hooks on the others), e.g.
    ``IGDefense(model, ["layer3", "layer4"], [m3, m4], sigma=4 / 255)``. One layer is the case of a one-item list.
    ``batch_passes``: with smoothing, run the noisy inputs and ``x`` through the layers before the masked layer in
    one call (concatenated along the batch). Default (None): on CUDA, where one larger batch fills the device
    better; not on the CPU, where ``benchmarks/bench_defense.py`` measured two calls faster (2.03× vs 2.14× the
    base forward for a ResNet-18 at batch 256).

    Example::

        mask = topk_mask(importance, k=16)                   # (N, C) 0/1 from an (N, C) ranking
        defense = IGDefense(model, "block3", mask, sigma=0.1)
        with noise.images(noise.image_keys(index, x), noise.stream(0, "mine")):
            logits = defense(x)                              # each image's first query on that stream
    """

    def __init__(self, model: nn.Module, layer: str | Sequence[str], mask: torch.Tensor | Sequence[torch.Tensor],
                 *, tau: float = DEFAULT_TAU, sigma: float | None = None, n_smooth: int = DEFAULT_N_SMOOTH,
                 rs: bool = True, seed: int = 0, eps: float | None = None, batch_passes: bool | None = None):
        super().__init__()
        if sigma is None and eps is not None:
            sigma = eps / 2
        check_settings(tau=tau, sigma=sigma, n_smooth=n_smooth, rs=rs)
        layers = [layer] if isinstance(layer, str) else list(layer)
        masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
        if not layers or len(layers) != len(masks):
            raise IgdError(f"{len(layers)} layer(s) but {len(masks)} mask(s): give one mask per layer")
        for m in masks:
            check_mask(m)
        self.model = model
        self.layers = check_layers(model, layers)
        #: the masked layer's name (several: joined with "+"), as recorded in artifacts and reports
        self.layer = "+".join(self.layers)
        self.tau, self.sigma, self.n_smooth, self.rs = float(tau), sigma, int(n_smooth), bool(rs)
        self.batch_passes = batch_passes
        device, dtype = module_device(model), module_dtype(model)
        for i, m in enumerate(masks):  # 0/1: exact in the model's float dtype
            self.register_buffer(_buffer(i), m.detach().to(device=device, dtype=dtype), persistent=False)
        self.split = LayerSplit(model, self.layers)
        self._checked = False
        self._noise = FreshNoise(seed)
        #: BPDA through the pseudo-label (None: off, the defence as deployed); see :meth:`bpda`
        self.bpda_temperature: float | None = None

    # -- settings / noise ----------------------------------------------------------------------------
    @property
    def masks(self) -> list[torch.Tensor]:
        """The (N_l, C) float masks, in ``self.layers`` order (``self.mask`` is the first)."""
        return [getattr(self, _buffer(i)) for i in range(len(self.layers))]

    @property
    def num_neurons(self) -> int:
        return int(self.mask.shape[0])

    @property
    def k(self) -> int | dict[str, int | None] | None:
        """Neurons kept per class (None where classes keep different numbers); one per layer for several."""
        ks = {layer: mask_k(m) for layer, m in zip(self.layers, self.masks)}
        return ks[self.layers[0]] if len(ks) == 1 else ks

    @property
    def randomized(self) -> bool:
        """True when the output is random (smoothing on with σ > 0 and fresh noise per query): attacks then use
        EoT and scoring repeated draws."""
        return self.rs and bool(self.sigma) and self._noise.fresh

    def settings(self) -> dict[str, Any]:
        """The defence settings as stored in a mask artifact's ``defense`` metadata."""
        return {"tau": self.tau, "sigma": self.sigma, "n_smooth": self.n_smooth, "rs": self.rs}

    @contextmanager
    def bpda(self, temperature: float | None) -> Iterator["IGDefense"]:
        """Within the block, ``ŷ``'s forward is unchanged and its backward is that of ``softmax(z / T)`` (BPDA,
        Athalye et al. 2018; the adaptive attack's stage 2), ``z`` the (mean) first-pass logits; None: off.

        Example::

            with defense.bpda(5.0):
                defense(x).logsumexp(1).sum().backward()
        """
        if temperature is not None and not temperature > 0:
            raise IgdError(f"BPDA temperature {temperature}: must be > 0")
        before = self.bpda_temperature
        self.bpda_temperature = None if temperature is None else float(temperature)
        try:
            yield self
        finally:
            self.bpda_temperature = before

    def pseudo_label(self, logits: torch.Tensor) -> torch.Tensor:
        """``ŷ = softmax(logits / τ)`` (B, C); under :meth:`bpda` with the relaxed backward. Computed in float32
        at least and returned in the logits' dtype: in fp16, ``logits / τ`` overflows once a logit exceeds
        65504·τ (655 at τ = 0.01)."""
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        if self.bpda_temperature is None:
            return F.softmax(z / self.tau, dim=1).to(logits.dtype)
        return _BPDASoftmax.apply(z, self.tau, self.bpda_temperature).to(logits.dtype)

    @property
    def seed(self) -> int:
        """The seed given at construction (or by :meth:`reseed`): what calibrate-k derives its noise stream from."""
        return self._noise.seed

    def reseed(self, seed: int | None = None) -> None:
        """Restart the fallback noise stream (from ``seed``, or the seed given at construction): what a query
        outside an :func:`igd_cli.noise.images` block draws (the model used as a plain module)."""
        self._noise.restart(seed)

    def skip_noise(self, x: torch.Tensor, queries: int) -> None:
        """Advance the rows of ``x`` as ``queries`` forwards would (each forward is one query per row), without
        running them: what :func:`igd_cli.scoring.classify` uses to leave out draws it does not need while every
        later draw stays the one the full sequence of queries gives."""
        if self.rs:
            self._noise.skip(x, queries)

    def sample_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``v`` of shape (n_s, *x.shape), ``N(0, σ²)``: one query of the rows of ``x`` (:mod:`igd_cli.noise`)."""
        return self._noise.sample(x, self.n_smooth).mul_(self.sigma)

    # -- the contract's optional capabilities (igd_cli.contract) -----------------------------------------
    def identity(self) -> dict[str, Any]:
        """What identifies this defence by content (its masks, layers and settings), for one built in memory; one
        read from a mask artifact is identified by the file (:func:`igd_cli.evaluate.defense_identity`)."""
        return mask_identity(torch.cat([m.flatten() for m in self.masks]), self.layer, self.settings())

    def surrogate(self, x: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """The adaptive attack's BPDA stand-in: the defended forward itself, with ``ŷ``'s backward that of
        ``softmax(z / T)`` at ``temperature`` T (:meth:`bpda`; None: the true gradient)."""
        with self.bpda(temperature):
            return self(x)

    def first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """Pass 1 as deployed, the logits whose ``softmax(· / τ)`` is ``ŷ``: ``mean_i f(x + v_i)`` with fresh noise
        (one query), ``f(x)`` without smoothing; the adaptive attack's stage 1 attacks it."""
        if not (self.rs and self.sigma):
            return self.model(x)
        return self.model(self._noisy(x)).reshape(self.n_smooth, x.shape[0], -1).mean(dim=0)

    def frozen(self, seed: int | None = None) -> "IGDefense":
        """A copy (sharing the model and masks) whose smoothing noise is one fixed draw for every image and query
        (:class:`igd_cli.noise.FixedNoise`, from ``seed`` or this defence's own): deterministic, so it is scored
        once and attacked without EoT (audit check 8)."""
        out = copy.copy(self)
        out._noise = FixedNoise(self._noise.seed if seed is None else seed)
        return out

    def changes_prediction(self, x: torch.Tensor) -> torch.Tensor:
        """Per row of one query, whether the mask changes the prediction from argmax ``ŷ`` (audit check 9)."""
        feats = self.features(x)
        return self.masked_tail(feats).argmax(1) != feats.yhat.argmax(1)

    def baseline(self, seed: int = 0) -> nn.Module:
        """The base model with this defence's smoothing noise and no mask: smoothing alone (the paper's Table 6,
        row 2; audit check 10)."""
        from .variants import SmoothedModel

        return SmoothedModel(self.model, sigma=self.sigma if self.rs and self.sigma else 0.0, seed=seed)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): the fx graphs hold their own buffer references
        out = super()._apply(fn, *args, **kwargs)
        fast_before = self.split.fast
        self.split = LayerSplit(self.model, self.layers)
        self.split.fast = self.split.fast and fast_before
        self._checked = False
        return out

    # -- the two passes ------------------------------------------------------------------------------
    def _ensure_checked(self, x: torch.Tensor) -> None:
        if not self._checked:
            self.split.check(x[: min(8, x.shape[0])].detach())
            self._checked = True

    def features(self, x: torch.Tensor, with_base: bool = False) -> Features:
        """Pass 1 (``ŷ``) and the clean output ``A(x)`` of the layer the network is split at (the first masked
        one); with ``with_base`` also the base logits ``f(x)``."""
        self._ensure_checked(x)
        b = x.shape[0]
        split = self.split
        if not self.rs:
            if split.fast:
                a, ctx = split.head(x)
                logits = split.tail(a, ctx)
            else:  # one full forward gives both f(x) and A(x)
                with capture(self.model, split.name) as box:
                    logits = self.model(x)
                a, ctx = box["out"], (x,)
            return Features(a, ctx, self.pseudo_label(logits), logits if with_base else None)

        batched = x.is_cuda if self.batch_passes is None else self.batch_passes
        if split.fast and batched:
            noisy = self._noisy(x)
            a_all, ctx_all = split.head(torch.cat([noisy, x], dim=0))
            nb = self.n_smooth * b
            noisy_logits = split.tail(a_all[:nb], tuple(c[:nb] for c in ctx_all))
            a, ctx = a_all[nb:], tuple(c[nb:] for c in ctx_all)
            yhat = self._soft_label(noisy_logits, b)
        else:
            yhat = self.smoothed_label(x)
            if with_base and not split.fast:  # hook fallback: one full forward gives both A(x) and f(x)
                with capture(self.model, split.name) as box:
                    base = self.model(x)
                return Features(box["out"], (x,), yhat, base)
            a, ctx = split.head(x)
        base = split.tail(a, ctx) if with_base else None
        return Features(a, ctx, yhat, base)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        """The n_s noisy copies of ``x`` stacked along the batch (copy i of every example, then copy i + 1)."""
        return (x.unsqueeze(0) + self.sample_noise(x)).reshape(self.n_smooth * x.shape[0], *x.shape[1:])

    def _soft_label(self, noisy_logits: torch.Tensor, b: int) -> torch.Tensor:
        return self.pseudo_label(noisy_logits.reshape(self.n_smooth, b, -1).mean(dim=0))

    def smoothed_label(self, x: torch.Tensor) -> torch.Tensor:
        """Pass 1 with smoothing as a full forward of the noisy copies: ``ŷ`` (B, C)."""
        return self._soft_label(self.model(self._noisy(x)), x.shape[0])

    def weights(self, yhat: torch.Tensor, mask: torch.Tensor | Sequence[torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """``s_l = m_l ŷ`` (B, N_l) for every masked layer; ``mask``: the (N, C) mask of one layer or one per layer
        in ``self.layers`` order (default: the module's own)."""
        masks = self.masks if mask is None else ([mask] if isinstance(mask, torch.Tensor) else list(mask))
        if len(masks) != len(self.layers):
            raise ValueError(f"{len(masks)} masks for {len(self.layers)} layers")
        return {layer: yhat @ m.to(dtype=yhat.dtype).t() for layer, m in zip(self.layers, masks)}

    def masked_tail(self, feats: Features, mask: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Pass 2: the forward with every masked layer's output ``A_l`` scaled by ``s_l = m_l ŷ``, from the cached
        ``A`` of the split layer (fx split: only the layers after it run) or, in the hook fallback, from ``x``."""
        s = self.weights(feats.yhat, mask)
        if not self.split.fast:
            return self._hooked_forward(feats.ctx[0], s)
        first = self.split.name
        a = scale_output(feats.a, fit_weights(s.pop(first), feats.a, first))
        with scaled_layers(self.model, s):
            return self.split.tail(a, feats.ctx)

    def _hooked_forward(self, x: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward of ``x`` whose masked layers' outputs are scaled on the fly (the hook fallback)."""
        with scaled_layers(self.model, s):
            return self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Defended logits for images ``x`` in [0, 1]; differentiable through both passes."""
        self._ensure_checked(x)
        if self.rs and not self.split.fast:
            # hook fallback: ŷ first, then one forward of x whose layer outputs are scaled on the fly, so A(x) is
            # computed once (2 forwards in all instead of the 3 of features() + masked_tail()). Same formula and
            # noise as features(); only float rounding can differ.
            return self._hooked_forward(x, self.weights(self.smoothed_label(x)))
        return self.masked_tail(self.features(x))


class _BPDASoftmax(torch.autograd.Function):
    """``softmax(z / τ)`` forward (the same kernel as the deployed ŷ) with the backward of ``softmax(z / T)``:
    for ``p = softmax(z / T)``, ``∂L/∂z = p ⊙ (g − ⟨g, p⟩) / T``. torch has no "forward of one function, gradient
    of another" op; the straight-through form ``p + (ŷ − p).detach()`` would change the forward by rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tau: float, temperature: float) -> torch.Tensor:
        p = F.softmax(logits.detach() / temperature, dim=1)
        ctx.save_for_backward(p)
        ctx.temperature = temperature
        return F.softmax(logits / tau, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        g = p * (grad - (grad * p).sum(dim=1, keepdim=True)) / ctx.temperature
        return g, None, None


def _buffer(i: int) -> str:
    """Buffer name of the i-th layer's mask: ``mask`` for the first (as in a one-layer defence), then ``mask_1`` ..."""
    return "mask" if i == 0 else f"mask_{i}"


def check_mask(mask: torch.Tensor, where: str = "mask") -> None:
    """An (N, C) matrix of zeros and ones, or a one-line IgdError."""
    if mask.ndim != 2:
        raise IgdError(f"{where}: expected an (N, C) matrix, found shape {list(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise IgdError(f"{where}: entries must be 0 or 1")


def mask_k(mask: torch.Tensor) -> int | None:
    """Neurons kept per class, when every class keeps the same number."""
    col = mask.sum(dim=0)
    return int(col[0]) if bool((col == col[0]).all()) else None


def check_layers(model: nn.Module, layers: Sequence[str]) -> tuple[str, ...]:
    """Full names of distinct, non-nested layers (masking a block and a layer inside it is refused)."""
    full = tuple(resolve_layer(model, layer) for layer in layers)
    for i, a in enumerate(full):
        for b in full[i + 1:]:
            if a == b:
                raise IgdError(f"layer {a} is listed twice")
            if b.startswith(a + ".") or a.startswith(b + "."):
                outer, inner = (a, b) if b.startswith(a + ".") else (b, a)
                raise IgdError(f"layers {outer} and {inner} nest: mask a layer or a layer inside it, not both")
    return full


# --- mask artifacts ---------------------------------------------------------------------------------

def save_mask(path: str | Path, target: "Target", layer: str | Sequence[str],
              mask: torch.Tensor | Sequence[torch.Tensor], *, k: int | Sequence[int],
              importance_path: str | Path | Sequence[str | Path],
              importance_meta: dict[str, Any] | Sequence[dict[str, Any]], defense: dict[str, Any],
              extra: dict[str, Any] | None = None) -> Path:
    """Write the mask artifact: provenance, layer(s), k, the importance files' sha256 and the defence settings.

    One layer: tensor ``mask`` and single values for ``layer``, ``k``, ``n_neurons`` (the CLI.md contract).
    Several (lists, one item per layer): one tensor per layer named by the layer, ``layers`` lists them, ``layer``
    joins them with "+", and ``k``, ``n_neurons`` are keyed by layer.
    """
    layers = [layer] if isinstance(layer, str) else list(layer)
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    ks = [k] if isinstance(k, int) else list(k)
    paths = [importance_path] if isinstance(importance_path, (str, Path)) else list(importance_path)
    metas = [importance_meta] if isinstance(importance_meta, dict) else list(importance_meta)
    if not len(layers) == len(masks) == len(ks) == len(paths) == len(metas):
        raise ValueError("save_mask: one mask, k, importance file and importance metadata per layer")
    one = len(layers) == 1

    def per_layer(values: list[Any]) -> Any:
        return values[0] if one else dict(zip(layers, values))

    methods = list(dict.fromkeys(m.get("method") for m in metas))
    meta = {**target.provenance(), "layer": "+".join(layers), "k": per_layer([int(v) for v in ks]),
            "n_neurons": per_layer([int(m.shape[0]) for m in masks]),
            "importance_file": str(paths[0]) if one else [str(p) for p in paths],
            "importance_sha256": file_sha256(paths[0]) if one else [file_sha256(p) for p in paths],
            "method": methods[0] if len(methods) == 1 else methods, "probe": metas[0].get("data"),
            "defense": defense, **(extra or {})}
    if not one:
        meta["layers"] = layers
    names = ["mask"] if one else layers
    return save_artifact(path, "mask", {n: m.to(torch.uint8).cpu() for n, m in zip(names, masks)}, meta)


def artifact_layer(art: Artifact, model: nn.Module, layer: str | None = None) -> str:
    """The layer an artifact was made for (its ``layer``, or the given one of its layers), checked to exist in
    ``model`` under that exact full name."""
    layer = art.meta.get("layer") if layer is None else layer
    if not isinstance(layer, str):
        raise IgdError(f"{art.path}: {art.kind} artifact has no layer in its metadata")
    try:
        full = resolve_layer(model, layer)
    except IgdError as exc:
        raise IgdError(f"{art.path}: made for layer {layer!r}, which this model does not have") from exc
    if full != layer:
        raise IgdError(f"{art.path}: made for layer {layer!r}, not {full!r}")
    return layer


def mask_tensor_names(meta: dict[str, Any]) -> dict[str, Any]:
    """Tensor name -> layer of a mask artifact: ``{"mask": layer}`` for one layer, ``{layer: layer}`` per layer
    named in ``layers`` for several."""
    layers = meta.get("layers")
    return {str(n): n for n in layers} if isinstance(layers, list) else {"mask": meta.get("layer")}


def mask_layers(art: Artifact) -> tuple[list[str], list[torch.Tensor]]:
    """The layers of a mask artifact and their (N, C) masks (an empty layer list when the metadata names none)."""
    names = mask_tensor_names(art.meta)
    return [layer for layer in names.values() if isinstance(layer, str)], [art[name] for name in names]


def mask_summary(meta: dict[str, Any], tensors: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per masked layer (layer, tensor, shape, N, k) from a mask artifact's metadata and tensor shapes
    (:func:`igd_cli.artifacts.tensor_info`), for ``igd inspect``."""
    ks, sizes = meta.get("k"), meta.get("n_neurons")
    rows = []
    for name, layer in mask_tensor_names(meta).items():
        shape = tensors.get(name, {}).get("shape")
        rows.append({"layer": layer, "tensor": name, "shape": shape,
                     "n_neurons": sizes.get(layer) if isinstance(sizes, dict) else (shape or [sizes])[0],
                     "k": ks.get(layer) if isinstance(ks, dict) else ks})
    return rows


def load_mask(target: "Target", mask_path: str | Path) -> Artifact:
    """Read a mask artifact and check it belongs to this model (fingerprint), its layer(s) and class count."""
    art = load_artifact(mask_path, kind="mask", fingerprint=target.loaded.fingerprint)
    layers, masks = mask_layers(art)
    if not layers:
        artifact_layer(art, target.model)  # the one-line "has no layer" error
    for layer, m in zip(layers, masks):
        artifact_layer(art, target.model, layer)
        where = f"{mask_path}: mask" + (f" of {layer}" if len(layers) > 1 else "")
        if m.ndim != 2 or m.shape[1] != target.loaded.num_classes:
            raise IgdError(f"{where} shape {list(m.shape)} does not fit a model with "
                           f"{target.loaded.num_classes} classes")
        check_mask(m, where)
    check_layers(target.model, layers)
    return art


def load_defense(target: "Target", mask_path: str | Path, *, sigma: float | None = None,
                 n_smooth: int | None = None, tau: float | None = None, rs: bool | None = None,
                 seed: int = 0) -> IGDefense:
    """The defended model for ``target`` from a mask artifact (one layer or several); unspecified settings come
    from the mask.

    Example::

        defense = load_defense(open_target("demo"), "mask.safetensors")        # igd calibrate-k --out
        defense.k, defense.layer, defense.settings()
    """
    art = load_mask(target, mask_path)
    stored = art.meta.get("defense") or {}
    if not isinstance(stored, dict):
        stored = {}
    tau = float(stored.get("tau", DEFAULT_TAU)) if tau is None else tau
    n_smooth = int(stored.get("n_smooth", DEFAULT_N_SMOOTH)) if n_smooth is None else n_smooth
    rs = bool(stored.get("rs", True)) if rs is None else rs
    if sigma is None:
        sigma = stored.get("sigma")
        if sigma is None and rs:
            eps = stored.get("eps")
            if eps is None:
                from .common import FOR_SMOOTHING

                eps = target.default_eps(FOR_SMOOTHING)
            sigma = eps / 2
    layers, masks = mask_layers(art)
    defense = IGDefense(target.model, layers, [m.to(target.device) for m in masks], tau=tau, sigma=sigma,
                        n_smooth=n_smooth, rs=rs, seed=seed)
    defense.mask_artifact = art  # what the defence was built from: its identity needs no second read of the file
    return defense
