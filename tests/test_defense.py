"""IG-Defense forward against the literal two-pass formula of METHOD.md (demo and real ResNet-18), gradients,
the hook fallback, noise seeding, masks and mask artifacts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from igd_cli.artifacts import save_artifact
from igd_cli.defense import IGDefense, importance_ranks, load_defense, save_mask, topk_mask
from igd_cli.errors import IgdError
from igd_cli import noise as noise_mod

from .noise_blocks import block, first_draws
from .varied_images import cifar_images, n_classes_predicted


def times_weights(model, layer, s):
    """A forward hook of this test's own (no igd_cli.layers helper) that multiplies every example's layer output
    ``A_b`` (N, ...) by its own weights ``s_b`` (N,): ``out[b, j, ...] * s[b, j]``."""
    return model.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: torch.einsum("bj...,bj->bj...", out, s.to(out.dtype)))


def weights_of(model, mask, x, *, tau=0.01, noise=None):
    """s = m ŷ per example (B, N), ŷ = softmax(mean over the noise draws of f(x + v) / τ)."""
    mean_logits = model(x) if noise is None else torch.stack([model(x + v) for v in noise]).mean(0)
    return F.softmax(mean_logits / tau, dim=1) @ mask.float().t()


def literal(model, layer, mask, x, *, tau=0.01, noise=None):
    """METHOD.md steps 2-3 written out with plain forwards and this test's own hook: ŷ from (noisy) full passes,
    then the full model again with the layer's output multiplied by s = m ŷ."""
    s = weights_of(model, mask, x, tau=tau, noise=noise)
    handle = times_weights(model, layer, s)
    try:
        return model(x)
    finally:
        handle.remove()


def assert_weights_vary(model, mask, x, **kw):
    """Most images of the test batch have weights far from the batch's mean weights (and there are several
    distinct ones), so a defence that mixed the images of a batch (averaged the weights) would change the output."""
    with torch.no_grad():
        s = weights_of(model, mask, x, **kw)
    far = (s - s.mean(0)).abs().amax(1) > 0.05
    assert int(far.sum()) > len(s) // 2 and len({tuple(r) for r in s.round(decimals=3).tolist()}) >= 3


def seeded_noise(seed, n_smooth, x, sigma):
    return first_draws(seed, x, sigma, n_smooth)


def random_mask(n, c, k, seed=0):
    return topk_mask(torch.rand(n, c, generator=torch.Generator().manual_seed(seed)), k)


@pytest.fixture(scope="module")
def digits_x():
    from igd_cli.data import load_dataset

    return load_dataset("digits", "test", 24).all().x


@pytest.mark.parametrize("n_smooth, tau", [(1, 0.01), (3, 0.01), (1, 1.0)])  # τ = 1: a soft ŷ, not one-hot
def test_demo_matches_literal_formula(demo, digits_x, n_smooth, tau):
    mask = random_mask(128, 10, 20)
    assert n_classes_predicted(demo.model, digits_x) >= 5
    assert_weights_vary(demo.model, mask, digits_x, tau=tau)
    with torch.no_grad():
        off = IGDefense(demo.model, "block3", mask, rs=False, tau=tau)
        assert off.split.fast
        assert torch.allclose(off(digits_x), literal(demo.model, "block3", mask, digits_x, tau=tau), atol=1e-5)
        on = IGDefense(demo.model, "block3", mask, sigma=0.1, n_smooth=n_smooth, tau=tau)
        with block(digits_x, 7):
            got = on(digits_x)
        want = literal(demo.model, "block3", mask, digits_x, tau=tau,
                       noise=seeded_noise(7, n_smooth, digits_x, 0.1))
        assert torch.allclose(got, want, atol=1e-5)
        with block(digits_x, 7):  # the calibrate-k / clean-accuracy route: features() + masked_tail()
            assert torch.allclose(on.masked_tail(on.features(digits_x)), want, atol=1e-5)
        # the masked output really differs from the base model: the test can fail
        assert not torch.allclose(got, demo.model(digits_x), atol=1e-3)


def test_injected_noise_and_batched_vs_separate_passes(demo, digits_x, monkeypatch):
    mask = random_mask(128, 10, 8, seed=1)
    noise = torch.randn((2, *digits_x.shape), generator=torch.Generator().manual_seed(3)) * 0.3
    d = IGDefense(demo.model, "block3", mask, sigma=0.3, n_smooth=2)
    monkeypatch.setattr(d, "sample_noise", lambda x: noise)
    with torch.no_grad():
        want = literal(demo.model, "block3", mask, digits_x, noise=noise)
        assert torch.allclose(d(digits_x), want, atol=1e-5)  # the default (separate passes on the CPU)
        for batched in (True, False):
            d.batch_passes = batched
            assert torch.allclose(d(digits_x), want, atol=1e-5)


@pytest.mark.parametrize("tau", [0.01, 1.0])
@pytest.mark.parametrize("layer", ["layer4", "layer2.1.conv1"])  # no context / a skip connection in the context
def test_resnet18_matches_literal_formula(resnet18, layer, tau):
    model = resnet18.model
    x = cifar_images(model, 6)
    assert n_classes_predicted(model, x) >= 4  # real images, several classes: every image gets its own weights
    n = {"layer4": 512, "layer2.1.conv1": 128}[layer]
    mask = random_mask(n, 10, n // 8)
    assert_weights_vary(model, mask, x, tau=tau)
    with torch.no_grad():
        off = IGDefense(model, layer, mask, rs=False, tau=tau)
        assert off.split.fast
        assert torch.allclose(off(x), literal(model, layer, mask, x, tau=tau), atol=1e-4, rtol=1e-4)
        on = IGDefense(model, layer, mask, sigma=4 / 255, tau=tau)
        want = literal(model, layer, mask, x, tau=tau, noise=seeded_noise(11, 1, x, 4 / 255))
        with block(x, 11):
            assert torch.allclose(on(x), want, atol=1e-4, rtol=1e-4)
        with block(x, 11):
            assert torch.allclose(on.masked_tail(on.features(x)), want, atol=1e-4, rtol=1e-4)
        # the test can fail: the defended logits are not the base model's
        assert not torch.allclose(want, model(x), atol=1e-2)


@pytest.mark.parametrize("rs", [False, True])
def test_hook_fallback_gives_the_same_logits(resnet18, rs):
    model = resnet18.model
    x = cifar_images(model, 4)
    mask = random_mask(512, 10, 50)
    assert_weights_vary(model, mask, x)
    fast = IGDefense(model, "layer4", mask, sigma=4 / 255, rs=rs, seed=5)
    slow = IGDefense(model, "layer4", mask, sigma=4 / 255, rs=rs, seed=5)
    slow.split.fast = False
    with torch.no_grad():
        with block(x, 5):
            a = fast(x)
        with block(x, 5):
            b = slow(x)
    assert not slow.split.fast and fast.split.fast
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    noise = seeded_noise(5, 1, x, 4 / 255) if rs else None
    with torch.no_grad():
        assert torch.allclose(b, literal(model, "layer4", mask, x, noise=noise), atol=1e-4, rtol=1e-4)
        with block(x, 5):  # the features() + masked_tail() route (calibrate-k, clean accuracy) in the fallback
            assert torch.allclose(slow.masked_tail(slow.features(x)), b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which, rs", [("demo", False), ("demo", True), ("resnet18", True)])
def test_gradients_flow_through_both_passes(request, digits_x, rs, which):
    loaded = request.getfixturevalue(which)
    model = loaded.model
    layer = "block3" if which == "demo" else "layer4"
    if which == "demo":
        x, n = digits_x[:6].clone(), 128
    else:
        x, n = cifar_images(model, 3), 512
    mask = random_mask(n, 10, n // 8)
    # τ = 1 keeps the soft label away from one-hot, so the pass-1 gradient is not numerically zero
    d = IGDefense(model, layer, mask, tau=1.0, sigma=0.05, rs=rs, seed=4)
    w = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(9))
    x1 = x.clone().requires_grad_(True)
    with block(x, 4):
        (d(x1) * w).sum().backward()
    x2 = x.clone().requires_grad_(True)
    noise = seeded_noise(4, 1, x, 0.05) if rs else None
    (literal(model, layer, mask, x2, tau=1.0, noise=noise) * w).sum().backward()
    assert x1.grad.abs().sum() > 0
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5, rtol=1e-3)
    # pass 1 contributes: the gradient differs from the one with ŷ treated as a constant
    x3 = x.clone().requires_grad_(True)
    with torch.no_grad():
        s = weights_of(model, mask, x, tau=1.0, noise=noise)
    handle = times_weights(model, layer, s)
    try:
        (model(x3) * w).sum().backward()
    finally:
        handle.remove()
    assert not torch.allclose(x1.grad, x3.grad, atol=1e-6)


def test_plain_module_fallback_stream(demo, digits_x, monkeypatch):
    """Outside an image block (the defence used as a plain module) the draws follow the calls: fresh per call,
    replayed by reseed, another seed another stream; under STRICT such a query is refused."""
    mask = random_mask(128, 10, 4)
    d = IGDefense(demo.model, "block3", mask, sigma=0.3, tau=0.5, seed=1)
    d = d.to("cpu")  # .to() rebuilds the fx split (its graphs hold their own buffer references)
    assert d.split.fast
    with torch.no_grad():
        with pytest.raises(noise_mod.UndeclaredQuery, match="outside"):
            d(digits_x)
        monkeypatch.setattr(noise_mod, "STRICT", False)
        d.reseed()
        a1, a2 = d(digits_x), d(digits_x)
        d.reseed()
        assert torch.equal(d(digits_x), a1)
        assert not torch.equal(a1, a2)  # the stream moves on between calls
        d.reseed(2)
        assert not torch.equal(d(digits_x), a1)
        e = IGDefense(demo.model, "block3", mask, sigma=0.3, tau=0.5, seed=2)
        d.reseed(2)
        assert torch.equal(d(digits_x), e(digits_x))
    assert d.randomized and not IGDefense(demo.model, "block3", mask, rs=False).randomized


def test_topk_mask_ties_and_nesting():
    imp = torch.tensor([[1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    assert topk_mask(imp, 1)[:, 0].tolist() == [0, 1, 0, 0]  # tie 3.0/3.0: lower index first
    assert topk_mask(imp, 2)[:, 1].tolist() == [1, 1, 0, 0]  # all tied: the first k neurons
    ranks = importance_ranks(torch.randn(50, 7, generator=torch.Generator().manual_seed(0)))
    for k in (1, 10, 49):
        m = (ranks < k)
        assert (m.sum(0) == k).all() and (m <= (ranks < k + 1)).all()
    with pytest.raises(IgdError, match="between 1 and N"):
        topk_mask(imp, 0)
    with pytest.raises(IgdError, match="between 1 and N"):
        topk_mask(imp, 5)
    with pytest.raises(IgdError, match="NaN"):
        topk_mask(torch.tensor([[1.0], [float("nan")]]), 1)


def test_bad_settings_refused(demo):
    mask = random_mask(128, 10, 4)
    for kw, msg in [({"tau": 0.0}, "--tau"), ({"n_smooth": 0, "sigma": 0.1}, "--n-smooth"),
                    ({"sigma": -0.1}, "--sigma"), ({}, "needs σ")]:
        with pytest.raises(IgdError, match=msg):
            IGDefense(demo.model, "block3", mask, **kw)
    with pytest.raises(IgdError, match="0 or 1"):
        IGDefense(demo.model, "block3", mask.float() * 0.5, rs=False)
    assert IGDefense(demo.model, "block3", mask, eps=0.2).sigma == pytest.approx(0.1)


def test_mask_artifact_round_trip_and_refusals(tmp_path):
    from igd_cli.common import open_target

    target = open_target("demo", None, None, device="cpu")
    imp_path = tmp_path / "imp.safetensors"
    imp = torch.rand(128, 10, generator=torch.Generator().manual_seed(0))
    save_artifact(imp_path, "importance", {"importance": imp},
                  {**target.provenance(), "layer": "block3", "method": "random", "n_neurons": 128})
    mask_path = save_mask(tmp_path / "m.safetensors", target, "block3", topk_mask(imp, 9), k=9,
                          importance_path=imp_path, importance_meta={"method": "random"},
                          defense={"tau": 0.02, "sigma": 0.05, "n_smooth": 2, "rs": True, "eps": 0.1})
    d = load_defense(target, mask_path)
    assert (d.tau, d.sigma, d.n_smooth, d.rs, d.layer) == (0.02, 0.05, 2, True, "block3")
    assert torch.equal(d.mask, topk_mask(imp, 9).float())
    d2 = load_defense(target, mask_path, sigma=0.2, n_smooth=1, tau=0.5, rs=False, seed=3)
    assert (d2.tau, d2.sigma, d2.n_smooth, d2.rs) == (0.5, 0.2, 1, False)
    # another model's mask
    save_artifact(tmp_path / "other.safetensors", "mask", {"mask": topk_mask(imp, 9)},
                  {**target.provenance(), "model_fingerprint": "0123456789abcdef", "layer": "block3"})
    with pytest.raises(IgdError, match="fingerprint"):
        load_defense(target, tmp_path / "other.safetensors")
    # another layer's mask, and a layer the model does not have
    save_artifact(tmp_path / "l2.safetensors", "mask", {"mask": topk_mask(imp, 9)},
                  {**target.provenance(), "layer": "block2"})  # block2 has 64 channels, the mask 128 rows
    with pytest.raises(IgdError, match="mask has 128 neurons but layer block2 outputs 64"):
        load_defense(target, tmp_path / "l2.safetensors", rs=False)(torch.rand(2, 1, 8, 8))
    save_artifact(tmp_path / "l9.safetensors", "mask", {"mask": topk_mask(imp, 9)},
                  {**target.provenance(), "layer": "layer9"})
    with pytest.raises(IgdError, match="does not have"):
        load_defense(target, tmp_path / "l9.safetensors")
    with pytest.raises(IgdError, match="expected a mask artifact"):
        load_defense(target, imp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(demo, digits_x):
    import copy

    mask = random_mask(128, 10, 8)
    gpu_model = copy.deepcopy(demo.model).cuda()
    d = IGDefense(gpu_model, "block3", mask.cuda(), sigma=0.1)
    x = digits_x.cuda()
    with torch.no_grad():
        with block(x, 3):
            got = d(x)
        want = literal(gpu_model, "block3", mask.cuda(), x, noise=seeded_noise(3, 1, x, 0.1))
    assert got.device.type == "cuda" and torch.allclose(got, want, atol=1e-4)
