"""IG-Defense, steps 2-3 of ``METHOD.md``: the two-pass soft-masked forward around any base model.

``ŷ = softmax(mean_i f(x + v_i) / τ)`` with ``v_i ~ N(0, σ²I)`` (no clipping), ``s = m ŷ`` (B, N), and the
prediction is ``h(A(x) ⊙ s)``. Nothing is detached: gradients flow through both passes.

The network is split at the masked layer with :class:`igd_cli.layers.LayerSplit` (fx graph split; hook fallback
when the model does not trace), so any model with a named layer works: RobustBench, torchvision, files, demo.

Noise (:mod:`igd_cli.noise`): the ``n_s`` draws of a row are a pure function of ``(seed, the row's bytes, k)``,
``k`` = the row's earlier occurrences since ``reseed``. An image's first evaluation after ``reseed`` therefore
gets the same noise in any batch, shard or order (so ``calibrate-k``, ``defend-eval`` and IW-WC with and without
skipping agree image by image), and repeated queries of one point (EoT) get fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .artifacts import Artifact, file_sha256, load_artifact, save_artifact
from .devices import module_device
from .errors import IgdError
from .layers import LayerSplit, capture, replaced, resolve_layer, scale_output
from .noise import ContentNoise

if TYPE_CHECKING:  # pragma: no cover
    from .common import Target

DEFAULT_TAU = 0.01
DEFAULT_N_SMOOTH = 1


# --- masks ------------------------------------------------------------------------------------------

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
    """The IG-Defense mask: column c keeps the k neurons with the largest ``importance[:, c]`` (uint8 0/1)."""
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
    ``batch_passes``: with smoothing, run the noisy inputs and ``x`` through the layers before the masked layer in
    one call (concatenated along the batch). Default (None): on CUDA, where one larger batch fills the device
    better; not on the CPU, where ``benchmarks/bench_defense.py`` measured two calls faster (2.03× vs 2.14× the
    base forward for a ResNet-18 at batch 256).
    """

    def __init__(self, model: nn.Module, layer: str, mask: torch.Tensor, *, tau: float = DEFAULT_TAU,
                 sigma: float | None = None, n_smooth: int = DEFAULT_N_SMOOTH, rs: bool = True, seed: int = 0,
                 eps: float | None = None, batch_passes: bool | None = None):
        super().__init__()
        if sigma is None and eps is not None:
            sigma = eps / 2
        check_settings(tau=tau, sigma=sigma, n_smooth=n_smooth, rs=rs)
        if mask.ndim != 2:
            raise IgdError(f"mask: expected an (N, C) matrix, found shape {list(mask.shape)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise IgdError("mask: entries must be 0 or 1")
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.tau, self.sigma, self.n_smooth, self.rs = float(tau), sigma, int(n_smooth), bool(rs)
        self.batch_passes = batch_passes
        device = module_device(model)
        self.register_buffer("mask", mask.detach().to(device=device, dtype=torch.float32), persistent=False)
        self.split = LayerSplit(model, self.layer)
        self._checked = False
        self._noise = ContentNoise(seed)

    # -- settings / noise ----------------------------------------------------------------------------
    @property
    def num_neurons(self) -> int:
        return int(self.mask.shape[0])

    @property
    def randomized(self) -> bool:
        """True when the output is random (smoothing on with σ > 0 and fresh noise per query): attacks then use
        EoT and scoring repeated draws."""
        return self.rs and bool(self.sigma) and self._noise.fresh

    def settings(self) -> dict[str, Any]:
        """The defence settings as stored in a mask artifact's ``defense`` metadata."""
        return {"tau": self.tau, "sigma": self.sigma, "n_smooth": self.n_smooth, "rs": self.rs}

    def reseed(self, seed: int | None = None) -> None:
        """Restart the smoothing-noise stream (from ``seed``, or the seed given at construction): every row
        counts as unseen again."""
        self._noise.restart(seed)

    def noise_state(self, x: torch.Tensor | None = None) -> tuple:
        """The stream's state before the next draw, to replay the noise exactly (of the batch ``x`` only, if
        given: much smaller)."""
        return self._noise.state(x)

    def set_noise_state(self, state: tuple) -> None:
        self._noise.set_state(state)

    def sample_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``v`` of shape (n_s, *x.shape), ``N(0, σ²)``, per row a function of (seed, its bytes, occurrence)."""
        return self._noise.sample(x, self.n_smooth).mul_(self.sigma)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda(): the fx graphs hold their own buffer references
        out = super()._apply(fn, *args, **kwargs)
        fast_before = self.split.fast
        self.split = LayerSplit(self.model, self.layer)
        self.split.fast = self.split.fast and fast_before
        self._checked = False
        return out

    # -- the two passes ------------------------------------------------------------------------------
    def _ensure_checked(self, x: torch.Tensor) -> None:
        if not self._checked:
            self.split.check(x[: min(8, x.shape[0])].detach())
            self._checked = True

    def features(self, x: torch.Tensor, with_base: bool = False) -> Features:
        """Pass 1 (``ŷ``) and the clean layer output ``A(x)``; with ``with_base`` also the base logits ``f(x)``."""
        self._ensure_checked(x)
        b = x.shape[0]
        split = self.split
        if not self.rs:
            if split.fast:
                a, ctx = split.head(x)
                logits = split.tail(a, ctx)
            else:  # one full forward gives both f(x) and A(x)
                with capture(self.model, self.layer) as box:
                    logits = self.model(x)
                a, ctx = box["out"], (x,)
            return Features(a, ctx, F.softmax(logits / self.tau, dim=1), logits if with_base else None)

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
            a, ctx = split.head(x)
        base = split.tail(a, ctx) if with_base else None
        return Features(a, ctx, yhat, base)

    def _noisy(self, x: torch.Tensor) -> torch.Tensor:
        """The n_s noisy copies of ``x`` stacked along the batch (copy i of every example, then copy i + 1)."""
        return (x.unsqueeze(0) + self.sample_noise(x)).reshape(self.n_smooth * x.shape[0], *x.shape[1:])

    def _soft_label(self, noisy_logits: torch.Tensor, b: int) -> torch.Tensor:
        return F.softmax(noisy_logits.reshape(self.n_smooth, b, -1).mean(dim=0) / self.tau, dim=1)

    def smoothed_label(self, x: torch.Tensor) -> torch.Tensor:
        """Pass 1 with smoothing as a full forward of the noisy copies: ``ŷ`` (B, C)."""
        return self._soft_label(self.model(self._noisy(x)), x.shape[0])

    def masked_tail(self, feats: Features, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pass 2: ``h(A(x) ⊙ m ŷ)`` for the given (N, C) mask (default: the module's own)."""
        m = self.mask if mask is None else mask
        s = feats.yhat @ m.to(dtype=feats.yhat.dtype).t()  # (B, C) @ (C, N) -> (B, N)
        return self.split.tail(scale_output(feats.a, self._fit(s, feats.a)), feats.ctx)

    def _fit(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if a.shape[1] != s.shape[1]:
            raise IgdError(f"mask has {s.shape[1]} neurons but layer {self.layer} outputs {a.shape[1]}")
        return s.to(a.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Defended logits for images ``x`` in [0, 1]; differentiable through both passes."""
        self._ensure_checked(x)
        if self.rs and not self.split.fast:
            # hook fallback: ŷ first, then one forward of x whose layer output is scaled on the fly, so A(x) is
            # computed once (2 forwards in all instead of the 3 of features() + masked_tail()). Same formula and
            # noise as features(); only float rounding can differ.
            s = self.smoothed_label(x) @ self.mask.to(x.dtype).t()
            with replaced(self.model, self.layer, lambda a: scale_output(a, self._fit(s, a))):
                return self.model(x)
        return self.masked_tail(self.features(x))


# --- mask artifacts ---------------------------------------------------------------------------------

def save_mask(path: str | Path, target: "Target", layer: str, mask: torch.Tensor, *, k: int,
              importance_path: str | Path, importance_meta: dict[str, Any], defense: dict[str, Any],
              extra: dict[str, Any] | None = None) -> Path:
    """Write the mask artifact (contract in the brief: provenance, layer, k, importance hash, defence settings)."""
    meta = {**target.provenance(), "layer": layer, "k": int(k), "n_neurons": int(mask.shape[0]),
            "importance_file": str(importance_path), "importance_sha256": file_sha256(importance_path),
            "method": importance_meta.get("method"), "probe": importance_meta.get("data"), "defense": defense,
            **(extra or {})}
    return save_artifact(path, "mask", {"mask": mask.to(torch.uint8).cpu()}, meta)


def artifact_layer(art: Artifact, model: nn.Module) -> str:
    """The layer an artifact was made for, checked to exist in ``model`` under that exact full name."""
    layer = art.meta.get("layer")
    if not isinstance(layer, str):
        raise IgdError(f"{art.path}: {art.kind} artifact has no layer in its metadata")
    try:
        full = resolve_layer(model, layer)
    except IgdError as exc:
        raise IgdError(f"{art.path}: made for layer {layer!r}, which this model does not have") from exc
    if full != layer:
        raise IgdError(f"{art.path}: made for layer {layer!r}, not {full!r}")
    return layer


def load_mask(target: "Target", mask_path: str | Path) -> Artifact:
    """Read a mask artifact and check it belongs to this model (fingerprint), layer and class count."""
    art = load_artifact(mask_path, kind="mask", fingerprint=target.loaded.fingerprint)
    artifact_layer(art, target.model)
    m = art["mask"]
    if m.ndim != 2 or m.shape[1] != target.loaded.num_classes:
        raise IgdError(f"{mask_path}: mask shape {list(m.shape)} does not fit a model with "
                       f"{target.loaded.num_classes} classes")
    if not bool(((m == 0) | (m == 1)).all()):
        raise IgdError(f"{mask_path}: mask entries must be 0 or 1")
    return art


def load_defense(target: "Target", mask_path: str | Path, *, sigma: float | None = None,
                 n_smooth: int | None = None, tau: float | None = None, rs: bool | None = None,
                 seed: int = 0) -> IGDefense:
    """The defended model for ``target`` from a mask artifact; unspecified settings come from the mask."""
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
    return IGDefense(target.model, art.meta["layer"], art["mask"].to(target.device), tau=tau, sigma=sigma,
                     n_smooth=n_smooth, rs=rs, seed=seed)
