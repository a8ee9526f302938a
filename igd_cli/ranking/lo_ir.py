"""LO-IR, leave-one-out importance ranking (METHOD.md step 1a), exact, in three interchangeable ways.

``I[j, c]`` = mean over probe images ``x`` of class ``c`` of ``|f_c(x) − f^{[j]}_c(x)|``, where ``f^{[j]}`` zeroes
neuron ``j`` (the whole channel of a 4-D output). Classes without any probe image get ``I[:, c] = 0``.

* ``naive``: the literal algorithm: one full forward over the probe set per neuron (the reference).
* ``closed-form``: when everything after the layer is per-channel (elementwise ops, eval BatchNorm, dropout in
  eval), then global average pooling, reshapes and one ``nn.Linear``, the change of logit ``c`` is
  ``W[c, j] · (g_j(A_j(x)) − g_j(0))`` with ``g_j`` = pooling ∘ per-channel ops: one pass gives all rows. The
  decision is made by reading the fx graph of the tail (never by layer name) and confirmed numerically on the
  first probe batch; anything unrecognised falls back to the batched tail.
* ``batched-tail``: run the network up to the layer once per batch, then only the rest of the network on many
  ablated copies at once, chunked so that memory stays bounded.

Reduced precision (``precision`` bf16/fp16) runs the network up to the layer under autocast; the logit changes
are always taken in fp32. One neuron's effect on a logit is about one bf16 step of that logit, so two logits
each rounded to bf16 do not rank like fp32 (measured at ResNet-18's ``layer3``: top-k Jaccard 0.79-0.81 mean,
0.62 worst against fp32). So the closed form evaluates its pooled features in fp32 from the layer output, and the
batched tail runs the rest of the network in fp32 on the (reduced-precision) layer output; the literal algorithm,
whose every forward would round, refuses a reduced precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..console import progress
from ..data import ImageSet
from ..errors import IgdError
from ..layers import LayerSplit, replaced
from ..devices import module_dtype
from ..precision import DTYPES, autocast, full_precision, memory_format

PATHS = ("auto", "closed-form", "batched-tail", "naive")

#: elements of ablated layer outputs held at once by the batched tail (64 MiB of float32)
DEFAULT_CHUNK_ELEMS = 1 << 24


@dataclass
class LoIrResult:
    """Rows ``neurons[0]..neurons[1]-1`` of the importance matrix and how they were computed."""

    importance: torch.Tensor  # float32 (rows, C), on the CPU
    path: str  # closed-form | batched-tail | naive
    neurons: tuple[int, int]
    class_counts: torch.Tensor  # int64 (C,): probe images per class
    reason: str | None = None  # why the closed form was not used (None when it was, or not tried)
    info: dict[str, Any] = field(default_factory=dict)


class _ClassMean:
    """Per-class running sums of |logit change| for a block of neurons; float64 so that every path agrees."""

    def __init__(self, rows: int, num_classes: int, device: torch.device):
        self.sums = torch.zeros(rows, num_classes, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.num_classes = num_classes

    def add_counts(self, y: torch.Tensor) -> None:
        self.counts += torch.bincount(y, minlength=self.num_classes)

    def add(self, diff: torch.Tensor, y: torch.Tensor, row0: int = 0) -> None:
        """``diff`` (B, r): |change of the ground-truth logit| of each image for neurons row0..row0+r-1."""
        onehot = F.one_hot(y, self.num_classes).to(torch.float64)
        self.sums[row0:row0 + diff.shape[1]] += diff.to(torch.float64).T @ onehot

    def result(self) -> torch.Tensor:
        mean = self.sums / self.counts.clamp(min=1).to(torch.float64)
        mean[:, self.counts == 0] = 0.0  # documented: a class with no probe image has importance 0
        return mean.to(torch.float32).cpu()


def _check_labels(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise IgdError(f"probe labels must lie in 0..{num_classes - 1} (the model's classes), found "
                       f"{int(y.min())}..{int(y.max())}")


def _rows(neurons: tuple[int, int] | None, n: int) -> tuple[int, int]:
    a, b = (0, n) if neurons is None else neurons
    if not 0 <= a < b <= n:
        raise IgdError(f"--neurons {a}:{b}: need 0 <= A < B <= N = {n}")
    return a, b


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def check_naive_precision(precision: str) -> None:
    """The literal algorithm rounds every forward's logits to ``precision``: a neuron's effect (about one bf16 step
    of a logit) would be lost in the rounding, so it runs in fp32 only (it is the reference)."""
    if DTYPES.get(precision) is not None:
        raise IgdError(f"--precision {precision}: the literal LO-IR (--exact-naive) would round both logits of every "
                       f"difference to {precision} and not rank like fp32; use --precision fp32 (it is the reference)")


def _full(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A floating tensor in the model's own dtype (a reduced-precision layer output back to fp32), others as they are."""
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _zero_channel(a: torch.Tensor, j: int) -> torch.Tensor:
    """``a`` with neuron ``j`` (dimension 1: a whole channel of a 4-D output) set to zero."""
    out = a.clone()
    out[:, j] = 0
    return out


# --- the literal algorithm ---------------------------------------------------------------------------

def lo_ir_naive(model: nn.Module, layer: str, data: ImageSet, num_classes: int, *,
                neurons: tuple[int, int] | None = None, n_neurons: int | None = None, batch_size: int = 128,
                show_progress: bool = True, precision: str = "fp32") -> LoIrResult:
    """The literal LO-IR: for each neuron, zero it with a forward hook and run the probe set (the reference).

    The probe set is streamed once (batches outside, neurons inside) so that it is decoded only once; every
    neuron still costs one full forward of every image. ``precision``: the forwards under autocast
    (:mod:`igd_cli.precision`).
    """
    check_naive_precision(precision)
    device = _device(model)
    if n_neurons is None:
        from ..layers import neuron_count

        n_neurons = neuron_count(model, layer, tuple(data.get(0, 1).x.shape[1:]))
    a, b = _rows(neurons, n_neurons)
    acc = _ClassMean(b - a, num_classes, device)
    n_batches = math.ceil(len(data) / batch_size)
    with torch.no_grad(), progress() as bar, autocast(precision, device):
        task = bar.add_task("LO-IR (literal)", total=n_batches * (b - a)) if show_progress else None
        for batch in data.batches(batch_size):
            _check_labels(batch.y, num_classes)  # on the data set's CPU labels: no device sync per batch
            x, y = memory_format(batch.x.to(device), precision), batch.y.to(device)
            acc.add_counts(y)
            base = model(x).gather(1, y[:, None])[:, 0]
            for j in range(a, b):
                with replaced(model, layer, lambda out, j=j: _zero_channel(out, j)):
                    abl = model(x).gather(1, y[:, None])[:, 0]
                acc.add((base - abl).abs()[:, None], y, j - a)
                if task is not None:
                    bar.advance(task)
    return LoIrResult(acc.result(), "naive", (a, b), acc.counts.cpu())


# --- closed form: recognise "per-channel ops -> global average pool -> linear" in the tail graph --------

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Identity)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
                          torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.softplus, F.hardswish, F.hardsigmoid,
                          F.hardtanh}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_SIZE_METHODS = {"size", "dim"}


def _desc(nd: fx.Node) -> str:
    """A short description of a graph node for the fallback reason."""
    target = nd.target if isinstance(nd.target, str) else getattr(nd.target, "__name__", str(nd.target))
    return f"{nd.op} {target}"


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass
class ClosedForm:
    """``pre(A)`` = pooled per-channel features (B, N) just before the final linear layer, its weight (C, N)."""

    pre: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor

    def delta(self, a: torch.Tensor) -> torch.Tensor:
        """``g_j(A_j) − g_j(0)`` for every image and neuron: (B, N)."""
        z = self.pre(a)
        z0 = self.pre(torch.zeros_like(a[:1]))
        return z - z0


def closed_form_plan(split: LayerSplit, a: torch.Tensor, ctx: tuple) -> tuple[ClosedForm | None, str]:
    """Read the tail graph: a :class:`ClosedForm` when it is per-channel ops, global average pooling, reshapes
    and one linear layer; otherwise ``None`` and the reason (the caller then uses the batched tail)."""
    gm = getattr(split, "_tail_gm", None) if split.fast else None  # the fx tail that LayerSplit built
    if gm is None:
        return None, f"no fx graph of the tail ({split.reason or 'hook fallback'})"
    n = a.shape[1]
    bsz = 3 if n == 2 else 2  # a batch size that cannot be confused with N in the shape checks
    sample = a[:1].expand(bsz, *a.shape[1:]).contiguous()
    sample_ctx = tuple(c[:1].expand(bsz, *c.shape[1:]).contiguous() for c in ctx)
    try:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(sample, *sample_ctx)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the closed form
        return None, f"shape propagation failed ({type(exc).__name__})"

    def shape(node: fx.Node) -> tuple[int, ...] | None:
        tm = node.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

    nodes = list(gm.graph.nodes)
    placeholders = [nd for nd in nodes if nd.op == "placeholder"]
    if any(nd.users for nd in placeholders[1:]):
        return None, "the tail uses values from before the layer (a skip connection jumps over it)"
    cur = placeholders[0]
    pooled = len(shape(cur) or ()) == 2
    linear: fx.Node | None = None
    for nd in nodes:
        if nd.op == "placeholder":
            continue
        if nd.op == "output":
            if linear is None or nd.args[0] is not linear:
                return None, "the tail's output is not the final linear layer's output"
            break
        if linear is not None:
            return None, f"{_desc(nd)}: an operation after the final linear layer"
        if nd.op == "call_method" and nd.target in _SIZE_METHODS or (
                nd.op == "call_function" and nd.target is getattr and nd.args[1:] == ("shape",)):
            if not all(u.op in ("call_method", "call_function") and (u.target in _RESHAPE_METHODS or
                                                                     u.target in _RESHAPE_FUNCTIONS)
                       for u in nd.users):
                return None, f"{_desc(nd)}: a size read used for something other than a reshape"
            continue
        first = nd.args[0] if nd.args else None
        extra: list[fx.Node] = []
        fx.node.map_arg((nd.args[1:], nd.kwargs), extra.append)
        size_only = all(e.target in _SIZE_METHODS or e.target is getattr for e in extra)
        if first is not cur or (extra and not (size_only and nd.target in _RESHAPE_METHODS | _RESHAPE_FUNCTIONS)):
            return None, f"{_desc(nd)}: not a single-input operation on the layer's output chain"
        if [u for u in cur.users if u is not nd and not (u.target in _SIZE_METHODS or u.target is getattr)]:
            return None, f"{cur.name}: its value is used twice (not a simple chain)"
        out_shape, in_shape = shape(nd), shape(cur)
        kind = _classify(gm, nd, in_shape, out_shape, n, bsz, pooled)
        if kind is None:
            return None, f"{_desc(nd)}: not a per-channel op, global average pooling or the final linear"
        if kind == "pool":
            pooled = True
        if kind == "linear":
            linear = nd
        cur = nd
    if linear is None:
        return None, "no final linear layer found"
    weight = gm.get_submodule(linear.target).weight.detach()

    # the features feeding the linear layer, as their own graph module
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for nd in nodes:
        if nd is linear:
            break
        if nd.op == "placeholder" and nd is not placeholders[0]:
            continue
        env[nd] = graph.node_copy(nd, lambda x: env[x])
    graph.output(env[linear.args[0]])
    pre = fx.GraphModule(gm, graph)
    return ClosedForm(pre, weight), ""


def _classify(gm: fx.GraphModule, nd: fx.Node, in_shape, out_shape, n: int, bsz: int, pooled: bool) -> str | None:
    """``elementwise`` | ``pool`` | ``reshape`` | ``linear`` for a recognised node, else None."""
    if in_shape is None or out_shape is None:
        return None
    if in_shape[:2] != (bsz, n):
        if not (pooled and in_shape[0] == bsz and math.prod(in_shape[1:]) == n):
            return None
    mod = gm.get_submodule(nd.target) if nd.op == "call_module" else None
    same = out_shape == in_shape
    # per-channel elementwise operations
    if mod is not None and isinstance(mod, _ELEMENTWISE_MODULES) and same:
        return "elementwise"
    if mod is not None and isinstance(mod, _DROPOUT_MODULES) and not mod.training and same:
        return "elementwise"
    if mod is not None and isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and same:
        ok = (not mod.training and mod.track_running_stats and mod.running_mean is not None
              and mod.num_features == n and in_shape[1] == n)
        return "elementwise" if ok else None
    if nd.op == "call_function" and nd.target in _ELEMENTWISE_FUNCTIONS and same:
        return "elementwise"
    if nd.op == "call_function" and nd.target is F.dropout and same:
        training = nd.kwargs.get("training", nd.args[2] if len(nd.args) > 2 else True)
        return "elementwise" if training is False else None
    if nd.op == "call_method" and nd.target in _ELEMENTWISE_METHODS and same:
        return "elementwise"
    # global average pooling over the whole (H, W) map
    if not pooled and len(in_shape) == 4:
        h, w = in_shape[2:]
        if out_shape in ((bsz, n, 1, 1), (bsz, n)):
            if _is_global_avg_pool(nd, mod, (h, w)):
                return "pool"
    # reshapes of (B, N, 1, 1) or (B, N): per-example numel stays N, the batch stays first
    if pooled and out_shape[0] == bsz and math.prod(out_shape[1:]) == n:
        if (nd.op == "call_method" and nd.target in _RESHAPE_METHODS) or \
                (nd.op == "call_function" and nd.target in _RESHAPE_FUNCTIONS) or \
                (mod is not None and isinstance(mod, nn.Flatten)):
            return "reshape"
    # the final linear layer on (B, N)
    if pooled and mod is not None and type(mod) is nn.Linear and in_shape == (bsz, n) and mod.in_features == n:
        return "linear"
    return None


def _is_global_avg_pool(nd: fx.Node, mod: nn.Module | None, hw: tuple[int, int]) -> bool:
    if mod is not None and isinstance(mod, nn.AdaptiveAvgPool2d):
        return _pair(mod.output_size) == (1, 1)
    if mod is not None and isinstance(mod, nn.AvgPool2d):
        return (_pair(mod.kernel_size) == hw and _pair(mod.padding) == (0, 0) and mod.divisor_override is None)
    if nd.op == "call_function" and nd.target is F.adaptive_avg_pool2d:
        size = nd.kwargs.get("output_size", nd.args[1] if len(nd.args) > 1 else None)
        return size is not None and _pair(size) == (1, 1)
    if nd.op == "call_function" and nd.target is F.avg_pool2d:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        args = dict(zip(names, nd.args[1:]))
        args.update(nd.kwargs)
        return (_pair(args.get("kernel_size")) == hw and _pair(args.get("padding", 0)) == (0, 0)
                and args.get("divisor_override") is None)
    if (nd.op == "call_method" and nd.target == "mean") or (nd.op == "call_function" and nd.target is torch.mean):
        dims = nd.kwargs.get("dim", nd.args[1] if len(nd.args) > 1 else None)
        if dims is None or "dtype" in nd.kwargs:
            return False
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        return sorted(d % 4 for d in dims) == [2, 3]
    return False


def _verify_closed_form(plan: ClosedForm, split: LayerSplit, a: torch.Tensor, ctx: tuple, rows: Sequence[int],
                        tol: float = 1e-4) -> bool:
    """Compare the closed form with real ablations for a few images and neurons (all classes' logits)."""
    m = min(a.shape[0], 8)
    a, ctx = a[:m], tuple(c[:m] for c in ctx)
    base = split.tail(a, ctx)
    delta = plan.delta(a)
    scale = max(1.0, float(base.abs().max()))
    for j in rows:
        got = base - split.tail(_zero_channel(a, j), ctx)
        want = delta[:, j:j + 1] * plan.weight[:, j][None, :]
        if not torch.allclose(got, want, rtol=1e-3, atol=tol * scale):
            return False
    return True


# --- the fast paths ----------------------------------------------------------------------------------

def lo_ir(model: nn.Module, layer: str, data: ImageSet, num_classes: int, *,
          neurons: tuple[int, int] | None = None, batch_size: int = 128, path: str = "auto",
          chunk_elems: int = DEFAULT_CHUNK_ELEMS, show_progress: bool = True, precision: str = "fp32"
          ) -> LoIrResult:
    """LO-IR rows ``neurons`` (default all), identical to :func:`lo_ir_naive` up to float32 rounding.

    ``path``: ``auto`` (closed form when the tail allows it, else the batched tail), or force one of
    ``closed-form`` (an error when it does not apply), ``batched-tail``, ``naive``. ``precision``: the forwards
    under autocast (:mod:`igd_cli.precision`) up to the layer; the logit changes are taken in fp32 (module doc),
    and the closed form is planned and verified in fp32 (the verification checks the algebra, not the rounding).
    """
    if path not in PATHS:
        raise IgdError(f"unknown LO-IR path {path!r} (choose from {', '.join(PATHS)})")
    split = LayerSplit(model, layer)
    if path == "naive":
        n = _layer_width(split, data)
        return lo_ir_naive(model, split.name, data, num_classes, neurons=neurons, n_neurons=n,
                           batch_size=batch_size, show_progress=show_progress, precision=precision)
    device = _device(model)
    full_dtype = module_dtype(model)
    n_batches = math.ceil(len(data) / batch_size)
    plan: ClosedForm | None = None
    reason: str | None = None
    acc: _ClassMean | None = None
    chosen = path
    with torch.no_grad(), progress() as bar, autocast(precision, device):
        task = None
        for bi, batch in enumerate(data.batches(batch_size)):
            _check_labels(batch.y, num_classes)  # on the data set's CPU labels: no device sync per batch
            x, y = memory_format(batch.x.to(device), precision), batch.y.to(device)
            if bi == 0:
                split.check(x[:4])  # the fx split must reproduce the model, else LayerSplit falls back to hooks
            a, ctx = split.head(x)  # under autocast: the only reduced-precision part
            a, ctx = _full(a, full_dtype), tuple(_full(c, full_dtype) for c in ctx)
            if bi == 0:
                a0, b0 = _rows(neurons, a.shape[1])
                acc = _ClassMean(b0 - a0, num_classes, device)
                if path in ("auto", "closed-form"):
                    with full_precision(device):  # plan and verify the algebra in fp32, whatever the precision
                        a4, ctx4 = split.head(x[:8])
                        plan, reason = closed_form_plan(split, a4, ctx4)
                        probe_rows = sorted({a0, (a0 + b0) // 2, b0 - 1})
                        if plan is not None and not _verify_closed_form(plan, split, a4, ctx4, probe_rows):
                            plan, reason = None, "the closed form disagreed with real ablations on the first batch"
                    if plan is None and path == "closed-form":
                        raise IgdError(f"LO-IR closed form does not apply at {split.name}: {reason}")
                chosen = "closed-form" if plan is not None else "batched-tail"
                per_example = math.prod(a.shape[1:])
                chunk = max(1, min(b0 - a0, chunk_elems // max(1, a.shape[0] * per_example)))
                n_chunks = 1 if plan is not None else math.ceil((b0 - a0) / chunk)
                if show_progress:
                    task = bar.add_task(f"LO-IR ({chosen})", total=n_batches * n_chunks)
            acc.add_counts(y)
            with full_precision(device):  # the logit changes in fp32, from the layer output on (module doc)
                if plan is not None:
                    w = plan.weight.abs()[y][:, a0:b0]  # |W[y_b, j]|
                    acc.add(w * plan.delta(a)[:, a0:b0].abs(), y)
                    if task is not None:
                        bar.advance(task)
                    continue
                base = split.tail(a, ctx).gather(1, y[:, None])[:, 0]
                bsz = a.shape[0]
                for j0 in range(a0, b0, chunk):
                    r = min(chunk, b0 - j0)
                    rep = a.unsqueeze(1).repeat(1, r, *([1] * (a.ndim - 1)))  # (B, r, N, ...)
                    rep[:, torch.arange(r, device=device), torch.arange(j0, j0 + r, device=device)] = 0
                    logits = split.tail(rep.reshape(bsz * r, *a.shape[1:]), LayerSplit.repeat_ctx(ctx, r))
                    gt = logits.reshape(bsz, r, -1).gather(2, y[:, None, None].expand(bsz, r, 1))[..., 0]
                    acc.add((base[:, None] - gt).abs(), y, j0 - a0)
                    if task is not None:
                        bar.advance(task)
    if acc is None:
        raise IgdError("the probe set is empty")
    info = {"fast_split": split.fast, "chunk": chunk if plan is None else None}
    return LoIrResult(acc.result(), chosen, (a0, b0), acc.counts.cpu(), reason if plan is None else None, info)


def _layer_width(split: LayerSplit, data: ImageSet) -> int:
    from ..layers import neuron_count

    return neuron_count(split.model, split.name, tuple(data.get(0, 1).x.shape[1:]))


__all__ = ["check_naive_precision", "lo_ir", "lo_ir_naive", "closed_form_plan", "ClosedForm", "LoIrResult", "PATHS"]
