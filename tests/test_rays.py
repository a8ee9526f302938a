"""RayS: finds the exact ℓ∞ boundary distance of a linear classifier, breaks an undefended model, stays in the
ε-ball and [0, 1], counts its queries, and does not depend on the batch."""

from __future__ import annotations

import torch
import torch.nn as nn

from igd_cli.attacks import make_attack, predict
from igd_cli.attacks.rays import RayS
from igd_cli.data import load_dataset


class Linear2(nn.Module):
    """Two classes, logits (0, w·x + b): the ℓ∞ distance to the boundary is |w·x + b| / ||w||₁."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone(), requires_grad=False)
        self.b = b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def test_rays_finds_the_exact_linf_distance_of_a_linear_model():
    g = torch.Generator().manual_seed(0)
    dim = 16
    w = torch.randn(dim, generator=g)
    x = 0.4 + 0.2 * torch.rand(8, 1, 4, 4, generator=g)
    b = -(x.flatten(1) @ w).mean().item() + 0.5  # some images on each side, boundaries well inside the box
    model = Linear2(w, b)
    y = predict(model, x)
    true = (x.flatten(1) @ w + b).abs() / w.abs().sum()
    assert (true < 0.3).all()
    atk = RayS(model, eps=1e-6, queries=3000)  # tiny ε: no early stop, so it must converge to the distance
    _, dist, queries = atk.search(x, y)
    assert torch.allclose(dist, true, atol=2e-3), (dist, true)
    assert (queries <= 3000 + 40).all()  # the last binary search may finish past the budget, as in the reference


def test_rays_breaks_an_undefended_model_and_stays_in_the_ball(demo):
    data = load_dataset("digits", "test", 24)
    b = data.all()
    eps = 0.45
    atk = make_attack("rays", demo.model, eps=eps, queries=300)
    x_adv = atk(b.x, b.y, b.index)
    clean = (predict(demo.model, b.x) == b.y).float().mean()
    robust = (predict(demo.model, x_adv) == b.y).float().mean()
    assert clean > 0.9 and robust < 0.5 * clean
    assert (x_adv - b.x).abs().amax() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # hard-label: a small ε that it cannot reach still returns a point in the ball (projected direction)
    small = make_attack("rays", demo.model, eps=0.01, queries=40)(b.x[:6], b.y[:6], b.index[:6])
    assert (small - b.x[:6]).abs().amax() <= 0.01 + 1e-6
    assert ((small - b.x[:6]).flatten(1).abs().amax(1) > 0).all()


def test_rays_points_do_not_depend_on_the_batch(demo):
    b = load_dataset("digits", "test", 10).all()
    atk = make_attack("rays", demo.model, eps=0.3, queries=120)
    whole = atk(b.x, b.y, b.index)
    parts = torch.cat([atk(b.x[i:i + 3], b.y[i:i + 3], b.index[i:i + 3]) for i in range(0, 10, 3)])
    assert torch.allclose(whole, parts, atol=1e-6)


def test_rays_query_budget_and_early_stop(demo):
    b = load_dataset("digits", "test", 8).all()
    atk = RayS(demo.model, eps=0.45, queries=200)
    x_adv, dist, q = atk.search(b.x, b.y)
    broken = dist <= 0.45
    assert broken.any()
    assert (q[~broken] >= 200).all()  # the unbroken ones used their whole budget
    assert (q <= 200 + 40).all()
