"""Layers by dotted name: look them up, capture or scale their output with hooks, and split the network there.

``LayerSplit`` writes ``f = tail ∘ head`` at the masked layer ``A``: ``head(x)`` returns the layer output and
whatever else the rest of the network needs (skip connections that jump over the layer), and ``tail`` finishes
the forward from there. It is built with ``torch.fx`` when the model traces, so the tail really runs only the
layers after ``A``; otherwise it falls back to hooks (``fast = False``): correct, but the tail is a full forward.
Given several layers, it splits at the first of them in the forward and keeps the others as modules of the tail,
so forward hooks on them (``scaled_layers``) fire there.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import IgdError


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def resolve_layer(model: nn.Module, name: str) -> str:
    """The full dotted name of a layer: an exact name, or the unique module whose name ends with ``.name``
    (so ``layer4`` finds ``model.layer4`` inside a normalisation wrapper)."""
    names = layer_names(model)
    if name in names:
        return name
    hits = [n for n in names if n.endswith("." + name)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise IgdError(f"--layer {name}: ambiguous, matches {', '.join(hits[:8])}")
    shallow = [n for n in names if n.count(".") <= 1]
    listed = shallow if len(names) > 40 else names
    more = f" and {len(names) - len(listed)} deeper ones (igd layers lists all)" if len(listed) < len(names) else ""
    raise IgdError(f"--layer {name}: no such layer; candidates: {', '.join(listed)}{more}")


def get_layer(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(resolve_layer(model, name))


def scale_output(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``a ⊙ s`` with per-example neuron weights ``s`` (B, N) broadcast over spatial dims of ``a`` (B, N, ...)."""
    return a * s.reshape(*s.shape, *([1] * (a.ndim - 2)))


@contextmanager
def capture(model: nn.Module, name: str) -> Iterator[dict[str, torch.Tensor]]:
    """Record the layer's output of every forward inside the block in ``box["out"]``."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        box["out"] = out

    handle = get_layer(model, name).register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


@contextmanager
def replaced(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the layer's output ``A`` by ``fn(A)`` in every forward inside the block."""
    handle = get_layer(model, name).register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def scaled(model: nn.Module, name: str, s: torch.Tensor) -> Iterator[None]:
    """Multiply the layer's output by per-example neuron weights ``s`` (B, N) inside the block."""
    with replaced(model, name, lambda a: scale_output(a, s)):
        yield


def fit_weights(s: torch.Tensor, a: torch.Tensor, name: str) -> torch.Tensor:
    """``s`` (B, N) in ``a``'s dtype, checked to have one weight per neuron of the layer output ``a``."""
    if a.shape[1] != s.shape[1]:
        raise IgdError(f"mask has {s.shape[1]} neurons but layer {name} outputs {a.shape[1]}")
    return s.to(a.dtype)


@contextmanager
def scaled_layers(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply each named layer's output by its own per-example neuron weights (B, N) inside the block, e.g.
    ``with scaled_layers(model, {"layer3": s3, "layer4": s4}): logits = model(x)``."""
    handles = [get_layer(model, name).register_forward_hook(
        lambda _m, _i, out, name=name, s=s: scale_output(out, fit_weights(s, out, name)))
        for name, s in weights.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_output_shape(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the layer's output for one input of ``input_shape`` (C, H, W)."""
    from .devices import module_device, module_dtype

    with torch.no_grad(), capture(model, name) as box:
        model(torch.zeros(1, *input_shape, device=module_device(model), dtype=module_dtype(model)))
    out = box.get("out")
    if not isinstance(out, torch.Tensor) or out.ndim < 2:
        raise IgdError(f"--layer {name}: its output is not a (batch, neurons, ...) tensor")
    return tuple(out.shape[1:])


def layer_table(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every named module with its type and output shape after the batch dimension (None where it does not run
    or returns no tensor) for one zero image of ``input_shape``: what ``igd layers`` lists.

    >>> layer_table(nn.Sequential(nn.Conv2d(3, 8, 3)), (3, 32, 32))
    [{'layer': '0', 'type': 'Conv2d', 'shape': [8, 30, 30]}]
    """
    from .devices import module_device, module_dtype

    shapes: dict[str, list[int]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, list(out.shape[1:]))
                                     if isinstance(out, torch.Tensor) else None)
             for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=module_device(model), dtype=module_dtype(model)))
    except RuntimeError as exc:  # the model cannot take this shape
        raise IgdError(f"the model does not run on one {'×'.join(map(str, input_shape))} image "
                       f"({' '.join(str(exc).split())[:160]}): pass --input-shape C,H,W") from exc
    finally:
        for h in hooks:
            h.remove()
    return [{"layer": n, "type": type(m).__name__, "shape": shapes.get(n)} for n, m in model.named_modules() if n]


def neuron_count(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> int:
    """N: channels of a 4-D output, features of a 2-D output."""
    return layer_output_shape(model, name, input_shape)[0]


#: modules that commute with a non-negative per-channel scale (relu(s·a) = s·relu(a), pool(s·a) = s·pool(a) for
#: s >= 0): masking before or after them is the same defence, so :func:`feeding_layer` names the module before them
CHANNEL_SCALE_COMMUTING: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)


def feeding_layer(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str | None, str]:
    """The module that unambiguously feeds the classifier, for a model whose architecture names no masked layer:
    ``(name, why)``, or ``(None, why not)``.

    The classifier is the last ``nn.Linear`` to run, whose output is the model's output; with F inputs, a candidate
    is a module that runs once and outputs F channels. It feeds the classifier when scaling its output channel by
    channel with ``s >= 0`` scales the classifier's input by the same ``s`` (checked numerically on two random
    images: only ReLU, pooling, flattening and the like in between, functional ones included). Every such module
    gives the same defence (the mask is such a scale); the name chosen is the last one that is not itself one of
    :data:`CHANNEL_SCALE_COMMUTING` (e.g. the block before ReLU and pooling), else the first.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(4, 3)).eval()
    >>> feeding_layer(net, (1, 8, 8))[0]
    '1'
    """
    from .devices import module_device

    modules = dict((n, m) for n, m in model.named_modules() if n)
    outs: dict[str, Any] = {}
    calls: dict[str, int] = {}
    order: list[str] = []

    def record(_m, _i, out, n):
        calls[n] = calls.get(n, 0) + 1
        outs[n] = out
        order.append(n)

    device = module_device(model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *input_shape, generator=g).to(device)
    hooks = [m.register_forward_hook(lambda m_, i_, o_, n=n: record(m_, i_, o_, n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    linears = [n for n in order if isinstance(modules[n], nn.Linear)]
    if not linears or not isinstance(logits, torch.Tensor) or outs[linears[-1]] is not logits and not (
            isinstance(outs[linears[-1]], torch.Tensor) and outs[linears[-1]].shape == logits.shape
            and torch.equal(outs[linears[-1]], logits)):
        return None, "no nn.Linear classifier produces the model's output"
    clf = linears[-1]
    n_in = modules[clf].in_features
    cands = [n for n in dict.fromkeys(order) if calls[n] == 1 and n != clf and not clf.startswith(n + ".")
             and isinstance(outs[n], torch.Tensor) and outs[n].ndim >= 2 and outs[n].shape[1] == n_in]
    if not cands:
        return None, f"no module outputs the {n_in} channels the classifier {clf} takes"
    box: dict[str, torch.Tensor] = {}
    pre = modules[clf].register_forward_pre_hook(lambda _m, args: box.__setitem__("z", args[0]))
    s = torch.rand(n_in, generator=g) + 0.25
    s[::4] = 0.0  # masked-out neurons too
    s = s.to(device)
    feeding = []
    try:
        with torch.no_grad():
            model(x)
            z0 = box["z"]
            want = z0 * s
            tol = 1e-5 * float(z0.abs().max().clamp_min(1e-12))
            for n in cands:
                with replaced(model, n, lambda a: scale_output(a, s.to(a.dtype).expand(a.shape[0], -1))):
                    model(x)
                if box["z"].shape == want.shape and torch.allclose(box["z"], want, rtol=1e-4, atol=tol):
                    feeding.append(n)
    finally:
        pre.remove()
    if not feeding:
        return None, (f"no module with {n_in} channels reaches the classifier {clf} channel by channel (something "
                      "other than ReLU and pooling lies in between)")
    named = [n for n in feeding if not isinstance(modules[n], CHANNEL_SCALE_COMMUTING)]
    pick = named[-1] if named else feeding[0]
    return pick, (f"the module feeding the classifier {clf} ({n_in} channels; between them only operations that "
                  "commute with a channel scale, such as ReLU and pooling)")


class _StopForward(Exception):
    pass


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[str]):
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


class LayerSplit:
    """``model = tail ∘ head`` at layer ``name``; ``head(x) -> (A, ctx)``, ``tail(A, ctx) -> logits``.

    ``fast`` is True when the tail runs only the layers after ``A`` (fx graph split), False for the hook
    fallback. ``ctx`` is a tuple of tensors with the batch as first dimension (see :meth:`repeat_ctx`).
    ``name`` may be several layers (``LayerSplit(model, ["layer3", "layer4"])``): the split is at the first of them
    in the forward (``.name``; the first one given in the fallback) and the others stay modules of the fx tail.
    """

    def __init__(self, model: nn.Module, name: str | Sequence[str]):
        self.model = model
        self.names = tuple(resolve_layer(model, n) for n in ([name] if isinstance(name, str) else name))
        if not self.names:
            raise ValueError("LayerSplit needs at least one layer")
        self.name = self.names[0]
        self.layer = model.get_submodule(self.name)
        self.fast = False
        self.reason = ""
        try:
            self._head_gm, self._tail_gm = self._split()
            self.fast = True
        except Exception as exc:  # tracing can fail in many ways: fall back, never guess
            self.name = self.names[0]
            self.layer = model.get_submodule(self.name)
            self.reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"

    # -- fx split -------------------------------------------------------------------------------------
    def _split(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        tracer = _LeafTracer(self.names)
        graph = tracer.trace(self.model)
        nodes = list(graph.nodes)
        calls = {name: [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name]
                 for name in self.names}
        first = min(self.names, key=lambda name: calls[name][0] if calls[name] else len(nodes))
        for name in (first, *self.names):  # the split layer must run once; the others (hooked) at least once
            if len(calls[name]) != 1 and (name == first or not calls[name]):
                raise ValueError(f"layer {name} is called {len(calls[name])} times in the forward")
        self.name, self.layer = first, self.model.get_submodule(first)
        layer_node = nodes[calls[first][0]]
        cut = nodes.index(layer_node)
        head_nodes, tail_nodes = nodes[: cut + 1], nodes[cut + 1:]
        tail_set = set(tail_nodes)
        live = [n for n in head_nodes if n is not layer_node and n.op != "get_attr"
                and any(u in tail_set for u in n.users)]
        consts = [n for n in head_nodes if n.op == "get_attr" and any(u in tail_set for u in n.users)]

        head = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in head_nodes:
            env[n] = head.node_copy(n, lambda a: env[a])
        head.output((env[layer_node], *[env[n] for n in live]))

        tail = fx.Graph()
        tenv: dict[fx.Node, fx.Node] = {layer_node: tail.placeholder("layer_out")}
        for i, n in enumerate(live):
            tenv[n] = tail.placeholder(f"ctx_{i}")
        for n in consts:
            tenv[n] = tail.node_copy(n, lambda a: tenv[a])
        for n in tail_nodes:
            tenv[n] = tail.node_copy(n, lambda a: tenv[a])
        root = tracer.root
        head_gm, tail_gm = fx.GraphModule(root, head), fx.GraphModule(root, tail)
        return head_gm, tail_gm

    # -- public API -----------------------------------------------------------------------------------
    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Run the network up to the layer: its output ``A`` and the context the tail needs."""
        if self.fast:
            out = self._head_gm(x)
            return out[0], tuple(out[1:])
        box: dict[str, torch.Tensor] = {}

        def hook(_m, _i, out):
            box["out"] = out
            raise _StopForward

        handle = self.layer.register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return box["out"], (x,)

    def tail(self, a: torch.Tensor, ctx: tuple) -> torch.Tensor:
        """Finish the forward from layer output ``a`` (the batch of ``a`` must match ``ctx``)."""
        if self.fast:
            return self._tail_gm(a, *ctx)
        handle = self.layer.register_forward_hook(lambda _m, _i, _out: a)
        try:
            return self.model(ctx[0])
        finally:
            handle.remove()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, ctx = self.head(x)
        return self.tail(a, ctx)

    @staticmethod
    def repeat_ctx(ctx: tuple, repeats: int) -> tuple:
        """The context for a batch whose every example is repeated ``repeats`` times (repeat_interleave)."""
        out = []
        for v in ctx:
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"the tail depends on a non-tensor value ({type(v).__name__})")
            out.append(v.repeat_interleave(repeats, dim=0))
        return tuple(out)

    def check(self, x: torch.Tensor, atol: float = 1e-4) -> bool:
        """Verify ``tail(head(x)) == model(x)`` on a real batch; falls back to hooks if not."""
        if not self.fast:
            return False
        # in full precision: the check is of the split, not of autocast's rounding
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            want = self.model(x)
            try:
                got = self.tail(*self.head(x))
                ok = got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=1e-4)
            except Exception as exc:
                ok, self.reason = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            self.fast = False
            self.reason = self.reason or "fx split did not reproduce the model's output"
        return ok

    def describe(self) -> dict[str, Any]:
        return {"layer": self.name, "fast_tail": self.fast, "fallback_reason": self.reason or None}
