"""The content-keyed smoothing noise: Gaussian, a function of (seed, row bytes, occurrence) only, fresh for
repeated queries, and the randomized defence it gives answers an image the same in any batch."""

from __future__ import annotations

import math

import pytest
import torch

from igd_cli.defense import IGDefense, topk_mask
from igd_cli.noise import ContentNoise, content_hash, gaussian, mix32


def _x(n, d=3 * 32 * 32, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed))


def test_samples_are_standard_normal():
    z = ContentNoise(0).sample(_x(512), 2)  # 2 draws x 512 rows x 3072 = 3.1M samples
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


def test_noise_of_a_row_depends_on_its_bytes_not_its_batch():
    x = _x(40)
    s = ContentNoise(3)
    a = s.sample(x, 2)
    s.restart()
    rows = [31, 2, 17]
    assert torch.equal(s.sample(x[rows], 2), a[:, rows])
    s.restart()
    assert torch.equal(s.sample(x.flip(0), 2), a.flip(1))
    s.restart(4)
    assert not torch.equal(s.sample(x, 2), a)  # the seed matters
    y = x.clone()
    y[0, 5] = torch.nextafter(y[0, 5], torch.tensor(2.0))  # one ulp in one pixel: another image
    s.restart(3)
    b = s.sample(y, 2)
    assert not torch.equal(b[:, 0], a[:, 0]) and torch.equal(b[:, 1:], a[:, 1:])


def test_repeated_queries_get_fresh_noise_and_restart_replays():
    x = _x(4)
    s = ContentNoise(0)
    first, second = s.sample(x, 1), s.sample(x, 1)
    assert not torch.equal(first, second)  # EoT samples of one point differ
    tiled = ContentNoise(0).sample(torch.cat([x, x]), 1)  # EoT tiled in one batch: the same two samples
    assert torch.equal(tiled[:, :4], first) and torch.equal(tiled[:, 4:], second)
    state = s.state(x)
    third = s.sample(x, 1)
    s.set_state(state)
    assert torch.equal(s.sample(x, 1), third)
    s.restart()
    assert torch.equal(s.sample(x, 1), first)


def test_hash_and_generator_are_exact_integer_functions():
    x = _x(6, 50)
    h = content_hash(x)
    assert h.dtype == torch.int64 and bool((h >= 0).all()) and len(set(h.tolist())) == 6
    assert torch.equal(content_hash(x[[4, 1]]), h[[4, 1]])
    v = torch.arange(0, 1 << 32, 977_777, dtype=torch.int64)
    m = mix32(v)
    assert int(m.min()) >= 0 and int(m.max()) < (1 << 32) and len(set(m.tolist())) == len(v)  # a bijection
    keys = torch.tensor([[1, 2], [3, 1]])
    g = gaussian(keys, (7, 3))
    assert g.shape == (2, 2, 7, 3) and torch.equal(g[0, 0], g[1, 1]) and not torch.equal(g[0, 0], g[0, 1])


def test_randomized_defence_answers_an_image_the_same_in_any_batch(demo):
    from igd_cli.data import load_dataset

    x = load_dataset("digits", "test", 30).all().x
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 6)
    # τ and σ large enough that the noise changes predictions: the comparison below can fail
    d = IGDefense(demo.model, "block3", mask, tau=0.5, sigma=0.4, seed=1)
    with torch.no_grad():
        d.reseed()
        whole = d(x)
        d.reseed()
        parts = torch.cat([d(x[i:i + 7]) for i in range(0, 30, 7)])
        d.reseed()
        picked = d(x[[29, 0, 13]])
        d.reseed(2)
        other = d(x)
    assert torch.allclose(parts, whole, atol=1e-5) and torch.allclose(picked, whole[[29, 0, 13]], atol=1e-5)
    assert not torch.allclose(other, whole, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_noise_equals_cpu_noise():
    x = _x(8)
    cpu = ContentNoise(5).sample(x, 2)
    gpu = ContentNoise(5).sample(x.cuda(), 2).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)


def test_attacks_query_a_randomized_defence_on_their_own_stream(demo):
    """run_attack restarts the defence's noise on the attack stream (seed XOR ATTACK_STREAM); evaluation uses
    the seed itself, so the point an attack keeps is judged under another draw than the attack saw."""
    from igd_cli.attacks import make_attack, run_attack
    from igd_cli.attacks.base import attack_stream
    from igd_cli.data import load_dataset

    data = load_dataset("digits", "test", 6)
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 6)
    d = IGDefense(demo.model, "block3", mask, tau=0.5, sigma=0.4, seed=3)
    seen = []
    original = d.reseed
    d.reseed = lambda seed=None: (seen.append(seed), original(seed))[1]
    run_attack(make_attack("fgsm", d, eps=0.1, seed=3), data, batch_size=4, show_progress=False)
    assert seen == [attack_stream(3)] * 2 and attack_stream(3) != 3
    x = data.all().x
    d.reseed(attack_stream(3))
    on_attack_stream = d(x)
    d.reseed(3)
    assert not torch.allclose(d(x), on_attack_stream, atol=1e-3)


def test_the_record_of_seen_rows_is_bounded(monkeypatch):
    import igd_cli.noise as noise

    monkeypatch.setattr(noise, "MAX_SEEN", 10)
    s = ContentNoise(0)
    for i in range(5):
        s.sample(_x(4, 8, seed=i), 1)
    assert len(s.seen) <= 14  # cleared once past 10, then refilled by at most one batch
