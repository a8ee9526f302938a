"""The smoothing noise: Gaussian, a pure function of (stream, the image's identity, the query's ordinal for that
image), never of the queried point's bytes; fresh for repeated queries; the same for an image in any batch."""

from __future__ import annotations

import math

import pytest
import torch

from igd_cli import noise
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.noise import FreshNoise, content_hash, gaussian, image_keys, mix32


def _x(n, d=3 * 32 * 32, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def _draw(x, keys, stream=5, queries=1, draws=1, rows=None):
    """The draws of ``queries`` successive queries of the rows of ``x`` in a fresh block of images ``keys``."""
    s = FreshNoise()
    with noise.images(keys, stream):
        with noise.rows(rows) if rows is not None else noise.rows(torch.arange(len(keys))):
            return [s.sample(x, draws) for _ in range(queries)]


def test_samples_are_standard_normal():
    x = _x(512)
    z = _draw(x, image_keys(None, x), draws=2)[0]  # 2 draws x 512 rows x 3072 = 3.1M samples
    assert z.shape == (2, 512, 3072)
    flat = z.flatten().double()
    n = flat.numel()
    assert abs(flat.mean()) < 5 / math.sqrt(n)
    assert abs(flat.std() - 1) < 0.005
    for t, p in ((1.0, 0.682689), (2.0, 0.954500), (3.0, 0.997300)):
        assert abs(float((flat.abs() < t).double().mean()) - p) < 0.002
    # rows, elements and draws are uncorrelated: means over each axis have unit variance after scaling
    rows = z[0].double()
    assert abs((rows.mean(1) * math.sqrt(3072)).var() - 1) < 0.25
    assert abs((rows.mean(0) * math.sqrt(512)).var() - 1) < 0.1
    assert abs(torch.corrcoef(torch.stack([z[0].flatten(), z[1].flatten()]))[0, 1]) < 0.005
    c = torch.corrcoef(rows[:64])
    assert (c - torch.eye(64, dtype=c.dtype)).abs().max() < 6 / math.sqrt(3072)


def test_a_draw_depends_on_the_image_and_the_ordinal_not_on_the_queried_point():
    """The root of batch-size dependence on GPUs: a point computed a last bit differently must keep its noise."""
    x = _x(40)
    keys = image_keys(torch.arange(100, 140), x)
    a = _draw(x, keys)[0]
    y = x.clone()
    y[:, 5] = torch.nextafter(y[:, 5], torch.tensor(2.0))  # one ulp in one pixel of every point
    assert torch.equal(_draw(y, keys)[0], a)
    assert torch.equal(_draw(torch.zeros_like(x), keys)[0], a)  # even a wholly different point
    assert not torch.equal(_draw(x, keys, stream=6)[0], a)  # the stream matters
    # the image's identity matters: its position and its clean content
    assert not torch.equal(_draw(x, image_keys(torch.arange(40), x))[0], a)
    x2 = x.clone()
    x2[0, 0] = torch.nextafter(x2[0, 0], torch.tensor(2.0))
    b = _draw(x, image_keys(torch.arange(100, 140), x2))[0]
    assert not torch.equal(b[:, 0], a[:, 0]) and torch.equal(b[:, 1:], a[:, 1:])


def test_an_image_gets_its_draws_in_any_batch_and_subset():
    x = _x(40)
    keys = image_keys(torch.arange(40), x)
    whole = _draw(x, keys, queries=3)
    rows = [31, 2, 17]
    picked = _draw(x[rows], keys[rows], queries=3)
    assert all(torch.equal(p, w[:, rows]) for p, w in zip(picked, whole))
    # inside a block of all 40, queries of a subset declared with rows(): the same draws
    sub = _draw(x[rows], keys, queries=3, rows=torch.tensor(rows))
    assert all(torch.equal(p, w[:, rows]) for p, w in zip(sub, whole))
    flipped = _draw(x.flip(0), keys.flip(0))[0]
    assert torch.equal(flipped, whole[0].flip(1))


def test_duplicate_images_get_their_own_draws():
    x = _x(5)
    twice = torch.cat([x, x])
    keys = image_keys(torch.arange(10), twice)
    z = _draw(twice, keys)[0]
    assert len(set(keys.tolist())) == 10
    assert not torch.equal(z[:, :5], z[:, 5:])
    # and each duplicate's draws do not depend on whether its twin is in the batch
    assert torch.equal(_draw(x, keys[5:])[0], z[:, 5:])


def test_repeated_queries_get_fresh_noise_and_a_new_block_replays():
    x = _x(4)
    keys = image_keys(None, x)
    first, second = _draw(x, keys, queries=2)
    assert not torch.equal(first, second)  # EoT samples of one point differ
    assert torch.equal(_draw(x, keys)[0], first)
    # one row listed twice in one query is two queries of its image, in order
    both = _draw(torch.cat([x, x]), keys, rows=torch.cat([torch.arange(4), torch.arange(4)]))[0]
    assert torch.equal(both[:, :4], first) and torch.equal(both[:, 4:], second)
    # skipping q queries leaves the next draw the one the (q + 1)-th query gets
    s = FreshNoise()
    with noise.images(keys, 5):
        s.skip(x, 1)
        assert torch.equal(s.sample(x, 1), second)


def test_nested_rows_compose_and_undeclared_subsets_are_refused():
    x = _x(6)
    keys = image_keys(None, x)
    whole = _draw(x, keys)[0]
    s = FreshNoise()
    with noise.images(keys, 5):
        with noise.rows(torch.tensor([5, 1, 3])):
            with noise.rows(torch.tensor([2, 0])):  # images 3 and 5
                got = s.sample(x[[3, 5]], 1)
            with pytest.raises(noise.UndeclaredQuery, match="2 rows where 3 images"):
                s.sample(x[:2], 1)
    assert torch.equal(got, whole[:, [3, 5]])
    assert noise.current_keys() is None


def test_outside_a_block_strict_refuses_and_the_fallback_follows_calls(monkeypatch):
    x = _x(3)
    s = FreshNoise(7)
    monkeypatch.setattr(noise, "STRICT", True)
    with pytest.raises(noise.UndeclaredQuery, match="outside"):
        s.sample(x, 1)
    monkeypatch.setattr(noise, "STRICT", False)
    a, b = s.sample(x, 1), s.sample(x, 1)
    assert not torch.equal(a, b)
    s.restart()
    assert torch.equal(s.sample(x, 1), a)


def test_hash_and_generator_are_exact_integer_functions():
    x = _x(6, 50)
    h = content_hash(x)
    assert h.dtype == torch.int64 and bool((h >= 0).all()) and len(set(h.tolist())) == 6
    assert torch.equal(content_hash(x[[4, 1]]), h[[4, 1]])
    v = torch.arange(0, 1 << 32, 977_777, dtype=torch.int64)
    m = mix32(v)
    assert int(m.min()) >= 0 and int(m.max()) < (1 << 32) and len(set(m.tolist())) == len(v)  # a bijection
    assert [noise.mix_int(int(t)) for t in v[:50]] == m[:50].tolist()  # the Python twin agrees
    keys = torch.tensor([[1, 2], [3, 1]])
    g = gaussian(keys, (7, 3))
    assert g.shape == (2, 2, 7, 3) and torch.equal(g[0, 0], g[1, 1]) and not torch.equal(g[0, 0], g[0, 1])
    assert noise.stream(0, "score") != noise.stream(0, "attack:aa") != noise.stream(1, "attack:aa")
    assert noise.stream(3, "x") == noise.stream(3, "x")


def test_randomized_defence_answers_an_image_the_same_in_any_batch(demo):
    from igd_cli.data import load_dataset

    x = load_dataset("digits", "test", 30).all().x
    keys = image_keys(torch.arange(30), x)
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 6)
    # τ and σ large enough that the noise changes predictions: the comparison below can fail
    d = IGDefense(demo.model, "block3", mask, tau=0.5, sigma=0.4)
    with torch.no_grad():
        with noise.images(keys, 1):
            whole = d(x)
        parts = []
        for i in range(0, 30, 7):
            with noise.images(keys[i:i + 7], 1):
                parts.append(d(x[i:i + 7]))
        with noise.images(keys[[29, 0, 13]], 1):
            picked = d(x[[29, 0, 13]])
        with noise.images(keys, 2):
            other = d(x)
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
    assert torch.allclose(picked, whole[[29, 0, 13]], atol=1e-5)
    assert not torch.allclose(other, whole, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_noise_equals_cpu_noise():
    x = _x(8)
    keys = image_keys(None, x)
    cpu = _draw(x, keys, draws=2)[0]
    gpu = _draw(x.cuda(), keys.cuda(), draws=2)[0].cpu()
    assert torch.equal(image_keys(None, x.cuda()).cpu(), keys)
    assert torch.allclose(cpu, gpu, atol=1e-5)


def test_attacks_query_a_randomized_defence_on_their_own_stream(demo):
    """An attack declares its images on a stream of its own (named by the attack): the point it keeps is judged
    under other draws than the ones it saw."""
    from igd_cli.attacks import make_attack
    from igd_cli.attacks.base import attack_stream
    from igd_cli.data import load_dataset
    from igd_cli.scoring import score_stream

    b = load_dataset("digits", "test", 6).all()
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 6)
    d = IGDefense(demo.model, "block3", mask, tau=0.5, sigma=0.4)
    seen = []
    original = d._noise.sample
    d._noise.sample = lambda x, n: (seen.append((noise._BLOCK.get().stream, noise.current_keys().clone())),
                                    original(x, n))[1]
    make_attack("fgsm", d, eps=0.1, seed=3)(b.x, b.y, b.index)
    keys = image_keys(b.index, b.x)
    # FGSM on a randomized defence averages its gradient over EoT samples: every one on the attack's stream (the
    # contract's probe of whether the defence has a gradient at all draws on its own)
    seen = [(s, k) for s, k in seen if s != noise.stream(0, "gradient-probe")]
    assert seen and {s for s, _ in seen} == {attack_stream(3, "fgsm")}
    assert all(torch.equal(k, keys) for _, k in seen)
    assert len({attack_stream(3, "fgsm"), attack_stream(3, "pgd"), score_stream(3), attack_stream(4, "fgsm")}) == 4
