"""Every hot path in the model's own dtype (issue 23, item 3): the defended forward (one and two masked layers, fx
split and hook fallback), every attack of the registry, the repeated-draw scoring and calibrate-k run on a float64
copy of the demo model with float64 images. A tensor made in the default dtype (float32) beside them then fails
loudly (float32 and float64 do not mix in conv/matmul or in an indexed write), as a tensor made on the default
device fails beside a CUDA model: this is the CPU's stand-in for the device check."""

from __future__ import annotations

import copy

import pytest
import torch

from igd_cli.attacks import ATTACKS, make_attack
from igd_cli.attacks.base import ROUNDING
from igd_cli.calibrate import calibrate_k
from igd_cli.data import ImageSet, load_dataset
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.devices import module_dtype
from igd_cli.layers import layer_output_shape, layer_table
from igd_cli.scoring import classify, score_set

from .noise_blocks import block

N = 24
EPS = 0.1
#: the attacks' budgets cut to a few steps/queries: the test is about dtypes, not strength
TINY = {"steps": 2, "restarts": 1, "queries": 10, "eot_iter": 2}
LAYERS = {"one": ["block3"], "two": ["block2", "block3"]}


@pytest.fixture(scope="module")
def model64(demo):
    return copy.deepcopy(demo.model).double().eval()


@pytest.fixture(scope="module")
def images():
    return load_dataset("digits", "test", N).all()


@pytest.fixture(scope="module")
def importances():
    g = torch.Generator().manual_seed(0)
    return {"block2": torch.rand(64, 10, generator=g), "block3": torch.rand(128, 10, generator=g)}


def defense(model, layers, importances, k=20, **kw):
    return IGDefense(model, layers, [topk_mask(importances[layer], k) for layer in layers],
                     **{"sigma": 0.2, "tau": 0.5, "seed": 1, **kw})


def test_the_float64_model_is_float64(model64):
    assert module_dtype(model64) == torch.float64
    assert all(p.dtype == torch.float64 for p in model64.parameters())


def test_probe_inputs_take_the_model_dtype(model64):
    """``layer_output_shape``/``layer_table`` run one zero image through the model: made in its dtype."""
    assert layer_output_shape(model64, "block3", (1, 8, 8))[0] == 128
    assert {row["layer"]: row["shape"] for row in layer_table(model64, (1, 8, 8))}["block3"][0] == 128


@pytest.mark.parametrize("rs", [True, False])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("which", sorted(LAYERS))
def test_defended_forward_float64(demo, model64, images, importances, which, fast, rs):
    """The float64 defence gives float64 logits, equal to the float32 defence's up to float32 rounding (the same
    masks and the same noise draws: the noise is drawn in float32 and cast, so it is equal in both dtypes)."""
    d64 = defense(model64, LAYERS[which], importances, rs=rs)
    d32 = defense(demo.model, LAYERS[which], importances, rs=rs)
    assert all(m.dtype == torch.float64 for m in d64.masks)
    for d in (d64, d32):
        d.split.fast = d.split.fast and fast
        d._checked = True  # keep the fallback chosen here
    x = images.x
    with torch.no_grad():
        with block(x):  # one block each: both queries are the first of the same images, so they draw alike
            out64 = d64(x.double())
        with block(x):
            out32 = d32(x)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out32.double(), atol=1e-3, rtol=1e-3)
    grad_x = x.double().requires_grad_(True)
    with block(x):
        d64(grad_x).logsumexp(1).sum().backward()  # the backward runs in float64 too
    assert grad_x.grad.dtype == torch.float64 and torch.isfinite(grad_x.grad).all()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_float64(model64, images, importances, name):
    """Every attack of the registry on the smoothed float64 defence: it runs, and its points are float64, inside
    the ε-ball and [0, 1]."""
    d = defense(model64, ["block3"], importances)
    atk = make_attack(name, d, eps=EPS, seed=0, num_classes=10, strict=False, **TINY)
    x = images.x.double()
    x_adv = atk(x, images.y, images.index)
    assert x_adv.dtype == torch.float64
    assert (x_adv - x).abs().max() <= EPS + ROUNDING  # the attacks' contract: x ± ε up to its rounding
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("which", sorted(LAYERS))
def test_scoring_float64(model64, images, importances, which):
    """Repeated-draw scoring (every part of :func:`classify`) on the float64 defence."""
    d = defense(model64, LAYERS[which], importances)
    x = images.x.double()
    clean, adv = score_set(d, x, (x + 0.05).clamp(0, 1), images.y, draws=2, batch_size=10)
    assert clean.n == adv.n == N and clean.draws == adv.draws == 2
    full = classify(d, x, images.y, 4, batch_size=10)
    parts = [classify(d, x, images.y, 4, batch_size=10, part=p) for p in ("final", "selection")]
    assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("which", sorted(LAYERS))
def test_calibrate_float64(model64, images, importances, which, cache):
    """calibrate-k on float64 images (cached features, and recomputed from the saved noise state): it runs, and
    its base accuracy is the float64 model's own."""
    x64 = images.x.double()
    data = ImageSet("digits-float64", "test", [str(i) for i in range(10)], N,
                    lambda i, j: (x64[i:j], images.y[i:j]))
    layers = LAYERS[which]
    d = IGDefense(model64, layers, [torch.ones(importances[layer].shape[0], 10) for layer in layers],
                  sigma=0.2, tau=0.5, seed=1)
    cal = calibrate_k(d, [importances[layer] for layer in layers], data, batch_size=10,
                      max_cache_bytes=(1 << 30) if cache else 0)
    with torch.no_grad():
        assert cal.base_correct == int((model64(x64).argmax(1) == images.y).sum())
    assert 1 <= cal.k <= cal.n_neurons and cal.info["recomputed_batches"] == (0 if cache else len(cal.order) * 3)


# --- the other direction: default dtype float64, model and images float32 --------------------------------------
# A tensor made in the default dtype and *added* to a float64 tensor promotes silently, so the direction above
# misses it; with the default dtype float64 and a float32 model, the same tensor turns the model's input float64
# and the model fails. pyautoattack's own code makes default-dtype tensors (``eps * torch.ones(...)``), so only
# the paths whose every tensor igd makes are run this way: the defended forward, igd's own attacks, scoring and
# calibrate-k.
OWN_ATTACKS = ("fgsm", "pgd", "rays")


@pytest.fixture
def default_float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("name", OWN_ATTACKS)
def test_own_attacks_under_default_float64(demo, images, importances, default_float64, name):
    d = defense(demo.model, ["block3"], importances)
    x_adv = make_attack(name, d, eps=EPS, seed=0, num_classes=10, strict=False, **TINY)(images.x, images.y,
                                                                                         images.index)
    assert x_adv.dtype == torch.float32


@pytest.mark.parametrize("which", sorted(LAYERS))
def test_forward_scoring_calibrate_under_default_float64(demo, images, importances, default_float64, which):
    d = defense(demo.model, LAYERS[which], importances)
    with torch.no_grad(), block(images.x):
        assert d(images.x).dtype == torch.float32
    clean, _ = score_set(d, images.x, images.x, images.y, draws=2, batch_size=10)
    assert clean.n == N
    data = ImageSet("digits", "test", [str(i) for i in range(10)], N, lambda i, j: (images.x[i:j], images.y[i:j]))
    cal = calibrate_k(d, [importances[layer] for layer in LAYERS[which]], data, batch_size=10, max_cache_bytes=0)
    assert 1 <= cal.k <= cal.n_neurons
