"""Variants of the defended model: the defence with frozen noise (deterministic, differentiable, the literal
formula with one fixed draw) and smoothing alone (the base model on a noisy input)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from igd_cli.attacks.base import is_randomized
from igd_cli.defense import IGDefense
from igd_cli import noise
from igd_cli.noise import FixedNoise, FreshNoise
from igd_cli.scoring import rows_for
from igd_cli.variants import SmoothedModel, frozen_noise

SIGMA, TAU = 0.3, 0.05


@pytest.fixture(scope="module")
def setup(demo):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(128, 10, generator=g) < 0.3).float()
    d = IGDefense(demo.model, "block3", mask, sigma=SIGMA, tau=TAU, seed=4)
    from igd_cli.data import load_dataset

    b = load_dataset("digits", "test", 24).all()
    return demo.model, mask, d, b.x, b.y


def _literal(model, mask, x, v):
    """IG-Defense with the noise ``v`` given, written with plain forwards and a hook (no igd helper)."""
    s = F.softmax(model(x + v) / TAU, dim=1) @ mask.t()
    h = model.block3.register_forward_hook(lambda _m, _i, out: out * s[:, :, None, None])
    try:
        return model(x)
    finally:
        h.remove()


def test_frozen_noise_defence_is_deterministic_and_the_literal_formula(setup):
    model, mask, d, x, y = setup
    f = frozen_noise(d)
    assert not f.randomized and not is_randomized(f) and rows_for(f, "draws", 5) == 1
    assert d.randomized  # the original keeps fresh noise
    a, b = f(x), f(x)
    assert torch.equal(a, b)
    assert torch.allclose(f(x.flip(0)).flip(0), a, atol=1e-6)  # the same in any batch order
    v = SIGMA * FixedNoise(4).sample(x, 1)[0]
    assert torch.equal(v[0], v[5])  # one draw, the same for every image
    xr = x.clone().requires_grad_(True)
    xl = x.clone().requires_grad_(True)
    out, ref = f(xr), _literal(model, mask, xl, v)
    assert torch.allclose(out, ref, atol=1e-5)
    g1, = torch.autograd.grad(F.cross_entropy(out, y), xr)
    g2, = torch.autograd.grad(F.cross_entropy(ref, y), xl)
    assert g1.abs().sum() > 0 and torch.allclose(g1, g2, atol=1e-6)  # differentiable, through both passes
    # and it is not the fresh-noise defence
    with noise.images(noise.image_keys(None, x), 0):
        assert not torch.allclose(d(x), a)


def test_fixed_noise_is_standard_normal():
    z = FixedNoise(0).sample(torch.zeros(1, 3, 200, 200), 2)
    assert z.shape == (2, 1, 3, 200, 200)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert not torch.equal(z[0], z[1]) and not torch.equal(z[0], FixedNoise(1).sample(torch.zeros(1, 3, 200, 200), 1)[0])


def test_smoothing_alone_is_the_base_model_on_a_noisy_input(setup):
    model, _, _, x, _ = setup
    s = SmoothedModel(model, SIGMA, seed=2)
    assert s.randomized and is_randomized(s) and rows_for(s, "draws", 5) == 10
    keys = noise.image_keys(None, x)
    with noise.images(keys, 2):
        first = s(x)
        second = s(x)
    with noise.images(keys, 2):
        ref = model(x + SIGMA * FreshNoise().sample(x, 1)[0])
    assert torch.allclose(first, ref, atol=1e-6)
    assert not torch.allclose(second, first)  # the second query draws fresh noise
    assert not SmoothedModel(model, 0.0).randomized
