"""Scoring a randomized defence (METHOD.md "Scoring a randomized defence"): the figures against closed-form values
of a synthetic randomized classifier, selection, independence of the final draws from the selection draws, the
deterministic case, and the k = N mask that is the base model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from igd_cli.noise import FreshNoise, image_keys
from igd_cli.scoring import (Score, alive, classify, final_of_selected, final_rows, rows_for, score_set, selected,
                             selection_rows)

SIGMA = 0.5


class NoisyLinear(nn.Module):
    """Two classes, logit margin ``w·(x + v)`` with ``v ~ N(0, σ²I)`` drawn as igd's noise draws it: an
    image with label 1 is classified correctly with probability ``Φ(w·x / (σ‖w‖))``."""

    randomized = True

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w
        self.noise = FreshNoise(0)

    def reseed(self, seed: int) -> None:
        self.noise.restart(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = SIGMA * self.noise.sample(x, 1)[0]
        m = (x + v).flatten(1) @ self.w
        return torch.stack([-m, m], dim=1)


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, generator=g)
    n = 3000
    # images whose margin spreads P(correct) over (0.02, 0.98)
    z = torch.linspace(-2, 2, n)
    direction = w / w.norm()
    x = (z[:, None] * SIGMA * direction[None, :] + 0.01 * torch.randn(n, 16, generator=g)).reshape(n, 1, 4, 4)
    p = [_phi(float(xi.flatten() @ w) / (SIGMA * float(w.norm()))) for xi in x]
    return NoisyLinear(w), x, torch.ones(n, dtype=torch.int64), p


def _within(got: float, want: float, var_sum: float, n: int, sds: float = 4.5) -> None:
    sd = math.sqrt(var_sum) / n
    assert abs(got - want) <= sds * sd + 1e-12, (got, want, sd)


def test_figures_match_the_closed_form(linear):
    model, x, y, p = linear
    r = 5
    bits = classify(model, x, y, rows_for(model, "draws", r), seed=0, batch_size=512)
    assert bits.shape == (2 * r, len(x))
    s = Score.of(final_of_selected([bits]))
    n = len(p)
    _within(s.mean, sum(p) / n, sum(q * (1 - q) for q in p) / r, n)
    maj = [sum(math.comb(r, k) * q ** k * (1 - q) ** (r - k) for k in range(r // 2 + 1, r + 1)) for q in p]
    _within(s.majority, sum(maj) / n, sum(q * (1 - q) for q in maj), n)
    every = [q ** r for q in p]
    _within(s.all_draws, sum(every) / n, sum(q * (1 - q) for q in every), n)
    assert s.all_draws < s.mean < s.majority + 0.1 and s.std > 0
    # the per-draw accuracies scatter as binomials: their sample std is near sqrt(Σ p(1-p)) / n
    assert 0.2 < s.std / (math.sqrt(sum(q * (1 - q) for q in p)) / n) < 2.5


def test_draws_are_fresh_per_query_and_the_same_in_any_batch(linear):
    model, x, y, _ = linear
    keys = image_keys(torch.arange(300), x[:300])
    a = classify(model, x[:300], y[:300], 6, seed=3, keys=keys, batch_size=64)
    b = classify(model, x[:300].flip(0), y[:300], 6, seed=3, keys=keys.flip(0), batch_size=17).flip(1)
    assert torch.equal(a, b)  # keyed by the images: order and batch size do not matter
    assert not torch.equal(a[0], a[1]) and not torch.equal(final_rows(a), selection_rows(a))


def test_selection_picks_the_lowest_mean_and_ties_go_to_the_earliest():
    t, f = True, False
    # 3 images, R = 2: rows 0-1 final draws, rows 2-3 selection draws
    c0 = torch.tensor([[t, t, t], [t, t, f], [t, f, t], [t, t, f]])
    c1 = torch.tensor([[f, f, t], [f, t, t], [f, f, t], [t, f, t]])
    c2 = torch.tensor([[t, f, f], [t, f, f], [f, t, f], [f, f, t]])
    # selection counts: image 0: 2, 1, 0 -> c2; image 1: 1, 0, 1 -> c1; image 2: 1, 2, 1 -> c0 (tie with c2)
    assert selected([c0, c1, c2]).tolist() == [2, 1, 0]
    final = final_of_selected([c0, c1, c2])
    assert final.tolist() == [[t, f, t], [t, t, f]]
    s = Score.of(final)
    assert s.per_draw == (2, 2) and s.majority_count == 1 and s.all_count == 1
    assert alive([c0, c1, c2]).tolist() == [False, False, True]  # c2 / c1 wrong in every selection draw


def test_final_draws_are_independent_of_the_selection(linear):
    """Three different points per image, each correct with probability 1/2: selecting the worst of three on its
    selection draws is biased low (a winner's curse), its fresh final draws are not. Scoring the selected points
    on the draws that selected them would read about 0.3; the protocol reads 0.5."""
    model, x, y, _ = linear
    w = model.w / model.w.norm()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2000, 16, generator=g)
    base -= (base @ w)[:, None] * w[None, :]  # margin 0: P(correct) = 1/2
    cands = []
    for j in range(3):
        shift = torch.randn(2000, 16, generator=g) * 0.1
        shift -= (shift @ w)[:, None] * w[None, :]  # another point with the same margin
        cands.append(classify(model, (base + shift * j).reshape(-1, 1, 4, 4), y[:2000], 10, seed=0))
    fresh = Score.of(final_of_selected(cands)).mean
    idx = selected(cands)
    reused = torch.stack([selection_rows(c) for c in cands]).gather(0, idx.view(1, 1, -1).expand(1, 5, -1))[0]
    assert abs(fresh - 0.5) < 0.03
    assert Score.of(reused).mean < 0.4


def test_a_deterministic_model_is_scored_once():
    model = nn.Linear(4, 3)
    x = torch.randn(50, 4)
    y = torch.randint(0, 3, (50,))
    assert rows_for(model, "draws", 5) == 1 and rows_for(model, "single-draw", 5) == 1
    x_adv = x + 0.3 * torch.randn(50, 4)
    clean, robust = score_set(model, x, x_adv, y, draws=5)
    ok = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
    assert robust.draws == 1 and robust.std == 0
    assert robust.mean == robust.majority == robust.all_draws == int(ok.sum()) / 50
    assert clean.mean == int((model(x).argmax(1) == y).sum()) / 50


def test_single_draw_protocol_is_the_and_over_one_draw(linear):
    model, x, y, _ = linear
    x, y = x[:400], y[:400]
    x_adv = x + 0.2
    assert rows_for(model, "single-draw", 5) == 1
    _, robust = score_set(model, x, x_adv, y, protocol="single-draw", seed=2)
    first = [classify(model, p, y, 1, seed=2, keys=image_keys(None, x))[0] for p in (x, x_adv)]
    assert robust.mean == int((first[0] & first[1]).sum()) / 400 and robust.std == 0
    # and it is draw 0 of the repeated-draw protocol's first candidate
    many = classify(model, x, y, 10, seed=2)
    assert torch.equal(many[0], first[0])


def test_scores_of_shards_merge_exactly(linear):
    model, x, y, _ = linear
    bits = classify(model, x[:500], y[:500], 10, seed=0)
    whole = Score.of(final_rows(bits))
    parts = [Score.of(final_rows(bits[:, :123])), Score.of(final_rows(bits[:, 123:]))]
    assert Score.merged(parts) == whole and Score.from_json(whole.to_json()) == whole


def test_a_table_says_when_the_worst_case_is_above_a_column():
    """Ten noisy candidates near the boundary and one strong one: on 5 selection draws the per-image choice often
    keeps a weak point, so the worst case lands above the strong column; the table says so, naming the column,
    and says nothing when the worst case is at or below every column, for a deterministic defence, or when the
    only column below it is a lower bound measured on survivors."""
    from igd_cli.eval_result import EvalResult
    from igd_cli.eval_table import table_cells, worst_above_column

    n, g = 400, torch.Generator().manual_seed(0)

    def bits(rows: int, p: float) -> torch.Tensor:
        return torch.rand(rows, n, generator=g) < p

    y = torch.zeros(n, dtype=torch.int64)
    res = EvalResult(y, torch.arange(n), ["a"], torch.ones(1, n, dtype=torch.bool), bits(10, 1.0), mode="iw-wc",
                     randomized=True)
    for i in range(9):
        res.defended[f"weak{i}"] = bits(10, 0.55)
    res.defended["strong"] = bits(10, 0.3)
    j = res.to_json()
    assert j["worst_case"] > j["robust_accuracy"]["strong"] + 0.02  # the phenomenon itself, driven where it shows
    assert worst_above_column(j) == ("strong", j["robust_accuracy"]["strong"])
    note = [s for s in table_cells(j).notes if "is above the" in s]
    assert len(note) == 1 and "strong column" in note[0] and "5 selection draws" in note[0]
    # the strong column alone: the worst case is that column's figure, no note
    alone = EvalResult(y, torch.arange(n), ["a"], res.clean_base, res.clean_defended, mode="iw-wc", randomized=True)
    alone.defended["strong"] = res.defended["strong"]
    assert worst_above_column(alone.to_json()) is None
    assert not any("is above the" in s for s in table_cells(alone.to_json()).notes)
    # a column measured on survivors is a lower bound, not a figure the worst case can be compared with
    res.survivors_only["strong"] = 100
    assert worst_above_column(res.to_json()) is None  # the weak columns are all above it
    # one draw (deterministic): the worst case is the AND over the columns, never above one
    det = EvalResult(y, torch.arange(n), ["a"], torch.ones(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool),
                     mode="iw-wc")
    det.defended["strong"], det.defended["weak"] = bits(1, 0.3), bits(1, 0.55)
    assert worst_above_column(det.to_json()) is None
