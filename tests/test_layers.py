"""Layers: lookup by name, hooks, neuron counts, and the fx head/tail split against the full forward."""

from __future__ import annotations

import pytest
import torch

from igd_cli.errors import IgdError
from igd_cli.layers import (LayerSplit, capture, layer_output_shape, neuron_count, resolve_layer, scale_output,
                            scaled)


def test_resolve_layer_exact_suffix_and_errors(demo):
    from igd_cli.archs import IMAGENET_MEAN, IMAGENET_STD, Normalized

    assert resolve_layer(demo.model, "block3") == "block3"
    wrapped = Normalized(demo.model, IMAGENET_MEAN[:1], IMAGENET_STD[:1])
    assert resolve_layer(wrapped, "block3") == "model.block3"
    with pytest.raises(IgdError) as err:
        resolve_layer(demo.model, "layer9")
    assert "candidates: block1, block1.0" in str(err.value) and "linear" in str(err.value)
    with pytest.raises(IgdError, match="ambiguous"):
        resolve_layer(demo.model, "0")


def test_unknown_layer_on_big_model_lists_shallow_names(resnet18):
    with pytest.raises(IgdError) as err:
        resolve_layer(resnet18.model, "layer5")
    msg = str(err.value)
    assert "layer4" in msg and "igd layers lists all" in msg and "\n" not in msg


def test_neuron_counts(demo, resnet18):
    assert neuron_count(demo.model, "block3", (1, 8, 8)) == 128
    assert layer_output_shape(resnet18.model, "layer4", (3, 32, 32)) == (512, 4, 4)
    assert neuron_count(resnet18.model, "layer3", (3, 32, 32)) == 256
    assert neuron_count(resnet18.model, "linear", (3, 32, 32)) == 10


def test_capture_and_scale(demo, digits_test):
    x = digits_test.get(0, 4).x
    with torch.no_grad(), capture(demo.model, "block3") as box:
        base = demo.model(x)
    a = box["out"]
    s = torch.rand(4, 128, generator=torch.Generator().manual_seed(0))  # every image its own weights
    with torch.no_grad(), scaled(demo.model, "block3", s):
        out = demo.model(x)
    # the reference written out here: channel j of image b times s[b, j], then the demo's pooling and linear layer
    want = demo.model.linear(torch.einsum("bjhw,bj->bjhw", a, s).mean((2, 3)))
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(scale_output(a, s), a * s[:, :, None, None]) and torch.equal(scale_output(a[:, :, 0, 0], s),
                                                                                    a[:, :, 0, 0] * s)
    assert not torch.allclose(out, base)
    with torch.no_grad():  # hooks are removed on exit
        assert torch.equal(demo.model(x), base)


@pytest.mark.parametrize("layer, ctx_len", [("layer4", 0), ("layer3", 0), ("layer2.1.conv1", 1), ("bn1", 0)])
def test_split_matches_full_forward_on_real_resnet18(resnet18, layer, ctx_len):
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    split = LayerSplit(resnet18.model, layer)
    assert split.fast, split.reason
    with torch.no_grad():
        a, ctx = split.head(x)
        assert len(ctx) == ctx_len  # a skip connection over layer2.1.conv1 must travel to the tail
        assert torch.allclose(split.tail(a, ctx), resnet18.model(x), atol=1e-5)
        # batched tails: every example repeated r times gives r copies of its logits
        r = 3
        rep = split.tail(a.repeat_interleave(r, 0), LayerSplit.repeat_ctx(ctx, r))
        assert torch.allclose(rep, resnet18.model(x).repeat_interleave(r, 0), atol=1e-5)
    assert split.check(x)


def test_split_hook_fallback_is_exact(resnet18):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    split = LayerSplit(resnet18.model, "layer3")
    split.fast = False  # force the hook path used for models torch.fx cannot trace
    with torch.no_grad():
        a, ctx = split.head(x)
        assert a.shape == (3, 256, 8, 8)
        assert torch.allclose(split.tail(a, ctx), resnet18.model(x), atol=1e-5)
        assert torch.allclose(split.tail(torch.zeros_like(a), ctx),
                              _with_zeroed(resnet18.model, "layer3", x), atol=1e-5)


def _with_zeroed(model, layer, x):
    from igd_cli.layers import replaced

    with replaced(model, layer, torch.zeros_like):
        return model(x)


def test_untraceable_model_falls_back(demo):
    class Branchy(torch.nn.Module):  # data-dependent control flow defeats torch.fx
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.sum() > 0:
                return self.inner(x)
            return -self.inner(x)

    m = Branchy(demo.model).eval()
    split = LayerSplit(m, "block3")
    assert not split.fast and split.reason
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(split(x), m(x), atol=1e-6)
