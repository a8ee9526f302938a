"""LO-IR: both fast paths against the literal algorithm (demo CNN, tiny and real CIFAR ResNets), fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igd_cli.data import ImageSet, load_dataset
from igd_cli.errors import IgdError
from igd_cli.layers import LayerSplit
from igd_cli.ranking.lo_ir import closed_form_plan, lo_ir, lo_ir_naive

from .conftest import SHARED_DATA


def tensor_set(x: torch.Tensor, y: torch.Tensor, classes: int) -> ImageSet:
    return ImageSet("tensors", "train", [str(i) for i in range(classes)], len(y), lambda i, j: (x[i:j], y[i:j]))


def literal(model: nn.Module, layer: str, data: ImageSet, num_classes: int, rows: tuple[int, int] | None = None,
            batch_size: int = 16, signed: bool = False) -> torch.Tensor:
    """METHOD.md step 1a written out here, independent of igd_cli (no shared helper): zero channel j of the layer's
    output with a forward hook, rerun the probe set, and average |f_y(x) - f^[j]_y(x)| over the probes of each
    class y (0 for a class without probes). ``signed``: without the absolute value (what a missing ``abs()`` gives)."""
    module = model.get_submodule(layer)
    with torch.no_grad():
        out_shape = []
        h = module.register_forward_hook(lambda _m, _i, out: out_shape.append(out.shape[1]))
        model(data.get(0, 1).x)
        h.remove()
        a, b = rows or (0, out_shape[0])
        total = torch.zeros(b - a, num_classes, dtype=torch.float64)
        count = torch.zeros(num_classes, dtype=torch.float64)
        for start in range(0, len(data), batch_size):
            batch = data.get(start, min(start + batch_size, len(data)))
            x, y = batch.x, batch.y
            base = model(x)[torch.arange(len(y)), y]
            count += torch.bincount(y, minlength=num_classes).double()
            for j in range(a, b):
                def zero(_m, _i, out, j=j):
                    out = out.clone()
                    out[:, j] = 0
                    return out
                h = module.register_forward_hook(zero)
                ablated = model(x)[torch.arange(len(y)), y]
                h.remove()
                change = base - ablated
                total[j - a].index_add_(0, y, (change if signed else change.abs()).double())
    return (total / count.clamp(min=1)).float()


def assert_same(fast: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 agreement: the literal algorithm subtracts two logits of magnitude ~10, so a few ulps (~1e-6)
    of absolute error per image are expected in it."""
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5), float((fast - ref).abs().max())


@pytest.fixture(scope="module")
def digits40():
    return load_dataset("digits", "train", 40)


def test_demo_block3_uses_closed_form_and_matches_literal(demo, digits40):
    ref = literal(demo.model, "block3", digits40, 10)
    naive = lo_ir_naive(demo.model, "block3", digits40, 10, batch_size=16, show_progress=False)  # --exact-naive
    assert_same(naive.importance, ref)
    res = lo_ir(demo.model, "block3", digits40, 10, batch_size=16, show_progress=False)
    assert res.path == "closed-form" and res.reason is None
    assert_same(res.importance, ref)
    assert ref.shape == (128, 10) and float(ref.abs().max()) > 0
    forced = lo_ir(demo.model, "block3", digits40, 10, batch_size=16, path="batched-tail", show_progress=False)
    assert forced.path == "batched-tail"
    assert_same(forced.importance, ref)


def test_demo_block2_general_path_shard_and_chunks(demo, digits40):
    ref = literal(demo.model, "block2", digits40, 10, rows=(5, 29))
    res = lo_ir(demo.model, "block2", digits40, 10, batch_size=16, neurons=(5, 29), chunk_elems=3000,
                show_progress=False)
    assert res.path == "batched-tail" and "block3" in res.reason  # the conv after block2 is not per-channel
    assert res.info["chunk"] < 24  # several chunks of ablated copies
    assert res.importance.shape == (24, 10)
    assert_same(res.importance, ref)
    with pytest.raises(IgdError, match="closed form does not apply"):
        lo_ir(demo.model, "block2", digits40, 10, path="closed-form", show_progress=False)


def test_hook_fallback_is_still_exact(demo, digits40, monkeypatch):
    def no_fx(self):
        raise RuntimeError("pretend the model does not trace")

    monkeypatch.setattr(LayerSplit, "_split", no_fx)
    assert not LayerSplit(demo.model, "block3").fast
    sub = ImageSet("d", "train", digits40.classes, 12, lambda i, j: digits40._get(i, j))
    ref = literal(demo.model, "block3", sub, 10, rows=(0, 20))
    res = lo_ir(demo.model, "block3", sub, 10, batch_size=5, neurons=(0, 20), show_progress=False)
    assert res.path == "batched-tail" and "fx" in res.reason and res.info["fast_split"] is False
    assert_same(res.importance, ref)


def _tiny_resnet(seed: int = 0) -> nn.Module:
    """RobustBench's CIFAR ResNet with one block per stage, random weights and perturbed BN statistics."""
    from igd_cli._compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return net.eval()


@pytest.mark.parametrize("layer,rows,path", [("layer4", (504, 512), "closed-form"), ("layer3", (0, 8), "batched-tail")])
def test_tiny_resnet_matches_literal(layer, rows, path):
    net = _tiny_resnet()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 3, 3, 3, 9])  # classes 2, 4..8 have no probe image
    data = tensor_set(x, y, 10)
    ref = literal(net, layer, data, 10, rows=rows, batch_size=3)
    res = lo_ir(net, layer, data, 10, batch_size=3, neurons=rows, show_progress=False)
    assert res.path == path and res.importance.shape == (rows[1] - rows[0], 10)
    assert_same(res.importance, ref)
    empty = [2, 4, 5, 6, 7, 8]
    assert torch.all(res.importance[:, empty] == 0) and torch.all(ref[:, empty] == 0)
    assert res.class_counts.tolist() == [1, 1, 0, 3, 0, 0, 0, 0, 0, 1]


class _PartialPool(nn.Module):
    """A tail that pools only 2x2 windows: not global pooling, so the closed form must not be used."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.bn = nn.BatchNorm2d(6).eval()
        self.fc = nn.Linear(6 * 4, 4)

    def forward(self, x):
        out = F.relu(self.bn(self.body(x)))
        return self.fc(F.avg_pool2d(out, 2).flatten(1))


class _ChannelMix(nn.Module):
    """A 1x1 convolution after the layer mixes channels: not per-channel."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.mix = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.mix(self.body(x)).mean((2, 3)))


class _PerChannelHead(nn.Module):
    """BN + SiLU + dropout (eval) + mean over (H, W) + view + linear: closed form applies."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        out = self.drop(F.silu(self.bn(self.body(x))))
        out = out.mean(dim=(-1, -2), keepdim=True)
        return self.fc(out.view(out.size(0), -1))


@pytest.mark.parametrize("cls,closed", [(_PartialPool, False), (_ChannelMix, False), (_PerChannelHead, True)])
def test_graph_inspection_decides_and_is_exact(cls, closed):
    torch.manual_seed(0)
    net = cls().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    split = LayerSplit(net, "body")
    plan, reason = closed_form_plan(split, *split.head(x))
    assert (plan is not None) == closed, reason
    data = tensor_set(x, y, 4)
    ref = literal(net, "body", data, 4, batch_size=4)
    res = lo_ir(net, "body", data, 4, batch_size=4, show_progress=False)
    assert res.path == ("closed-form" if closed else "batched-tail")
    assert_same(res.importance, ref)


def test_training_mode_dropout_is_not_trusted():
    net = _PerChannelHead().eval()
    net.drop.train()  # a dropout in training mode is random, not a fixed per-channel map
    split = LayerSplit(net, "body")
    plan, reason = closed_form_plan(split, *split.head(torch.rand(2, 3, 4, 4)))
    assert plan is None and "drop" in reason


def test_labels_outside_the_classes_are_an_error(demo):
    x = torch.rand(3, 1, 8, 8)
    data = tensor_set(x, torch.tensor([0, 1, 12]), 13)
    with pytest.raises(IgdError, match="labels"):
        lo_ir(demo.model, "block3", data, 10, show_progress=False)


def _cifar_probe(n: int) -> ImageSet:
    path = SHARED_DATA / "cifar10-train-4660.safetensors"
    if path.exists():
        return load_dataset(str(path), "train", n)
    g = torch.Generator().manual_seed(0)
    return tensor_set(torch.rand(n, 3, 32, 32, generator=g), torch.arange(n) % 10, 10)


@pytest.mark.parametrize("layer,rows,path", [("layer4", (100, 106), "closed-form"), ("layer3", (40, 46), "batched-tail")])
def test_real_resnet18_matches_literal(resnet18, layer, rows, path):
    data = _cifar_probe(6)
    ref = literal(resnet18.model, layer, data, 10, rows=rows, batch_size=6)
    res = lo_ir(resnet18.model, layer, data, 10, batch_size=6, neurons=rows, show_progress=False)
    assert res.path == path
    assert_same(res.importance, ref)
    assert float(ref.max()) > 0
    # the comparison guards abs(): on this real model some changes are negative (at layer4: W[y, j] < 0 with
    # Δ ≥ 0 after the ReLU; at layer3 the change of the whole remaining network), so a path that dropped abs()
    # (on the change, or on the closed form's weight) would give the signed importance, far from the reference
    signed = literal(resnet18.model, layer, data, 10, rows=rows, batch_size=6, signed=True)
    assert float((signed - ref).abs().max()) > 100 * 1e-5 + 1e-4 * float(ref.abs().max())
    assert float(signed.min()) < 0


class _MixingHook(nn.Module):
    """Per-channel-looking tail (ReLU module → global mean → linear) whose ReLU carries a forward hook that mixes
    neighbouring channels (instrumentation, a cross-channel normalisation added by the user): the fx graph shows a
    leaf ``nn.ReLU``, so the closed form looks eligible, but zeroing channel j also moves channel j + 1."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 4)
        self.act.register_forward_hook(lambda _m, _i, out: out + 0.5 * out.roll(1, dims=1))

    def forward(self, x):
        return self.fc(self.act(self.body(x)).mean((2, 3)))


def test_closed_form_rejected_when_it_disagrees_with_real_ablations():
    """The closed form's plan is accepted from the graph, then refused by the numerical check on the first batch
    (its assumption, that channel j moves only pooled feature j, fails), and the result is the literal ablation."""
    torch.manual_seed(0)
    net = _MixingHook().eval()
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    split = LayerSplit(net, "body")
    plan, reason = closed_form_plan(split, *split.head(x))
    assert plan is not None, reason  # the graph alone looks eligible
    data = tensor_set(x, y, 4)
    ref = literal(net, "body", data, 4, batch_size=4)
    res = lo_ir(net, "body", data, 4, batch_size=4, show_progress=False)
    assert res.path == "batched-tail" and "disagreed with real ablations" in res.reason
    assert_same(res.importance, ref)
    # the plan really is wrong here: its importance is far from the reference, so accepting it would fail above
    with torch.no_grad():
        a, _ = split.head(x)
        per_image = plan.weight.abs()[y] * plan.delta(a).abs()  # (B, N): |W[y_b, j]| · |Δ_bj|
        wrong = per_image.T @ F.one_hot(y, 4).float() / torch.bincount(y, minlength=4)
    assert not torch.allclose(wrong, ref, rtol=1e-2, atol=1e-3)
    with pytest.raises(IgdError, match="disagreed with real ablations"):
        lo_ir(net, "body", data, 4, batch_size=4, path="closed-form", show_progress=False)
