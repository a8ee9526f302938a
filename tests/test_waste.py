"""Work not worth doing: a clean-only evaluation of a randomized defence classified every image
2R times — R draws to "select" among one candidate, R to score it. It now makes the R final draws only, and every
figure is the old code's, bit for bit: the reference here is the old protocol written out with plain forwards of
the defence (2R queries per batch in an image block, the first R scored), independent of ``igd_cli.scoring``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from igd_cli import noise
from igd_cli.artifacts import load_artifact
from igd_cli.common import open_target
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.eval_result import EvalResult
from igd_cli.evaluate import Budgets, Evaluator, evaluate_defense
from igd_cli.scoring import classify, score_stream

from .noise_blocks import block

N, BS, R, SEED = 40, 16, 3, 5


@pytest.fixture(scope="module")
def target():
    return open_target("demo", None, None, "Linf", "cpu")


@pytest.fixture(scope="module")
def data(target):
    return target.data("test", N)


def make_defense(target, rs=True):
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 30)
    return IGDefense(target.model, "block3", mask, sigma=0.3, tau=0.5, seed=1, rs=rs)


class Counted:
    """Images the defence is queried with (a forward pre-hook: every query, whoever makes it)."""

    def __init__(self, module: nn.Module):
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._count)

    def _count(self, _m, args):
        self.images += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@torch.no_grad()
def old_protocol_bits(defense, x, y, rows, seed, batch_size):
    """The old clean scoring, written out: every batch (the images 0..n-1 of ``x``, in a block on the scoring
    stream) queried ``rows`` times in order; (rows, n)."""
    keys = noise.image_keys(None, x)
    bits = torch.zeros(rows, len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        with noise.images(keys[i:i + batch_size], score_stream(seed)):
            for r in range(rows):
                bits[r, i:i + batch_size] = defense(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
    return bits


def figures(final):
    """mean, per-draw counts, majority and all-draws counts of (R, n) bits, by their definitions."""
    per_image = final.sum(0)
    r = final.shape[0]
    return {"per_draw": [int(c) for c in final.sum(1)], "majority_count": int((2 * per_image > r).sum()),
            "all_count": int((per_image == r).sum()), "mean": int(final.sum()) / final.numel()}


def test_clean_only_evaluation_makes_r_draws_with_the_old_figures(target, data):
    d = make_defense(target)
    x, y = data.all().x, data.all().y
    ref = old_protocol_bits(d, x, y, 2 * R, SEED, BS)[:R]
    with Counted(d) as counter:
        res = evaluate_defense(target, d, data, attack="none", workdir=None, seed=SEED, batch_size=BS, draws=R,
                               show_progress=False)
    assert counter.images == R * N  # was 2R·N
    got = res.to_json()
    want = figures(ref)
    score = got["scores"]["defended"]["clean"]
    assert {k: score[k] for k in ("per_draw", "majority_count", "all_count")} == \
        {k: want[k] for k in ("per_draw", "majority_count", "all_count")}
    assert got["clean_accuracy"] == pytest.approx(want["mean"], abs=1e-12) and got["draws"] == R
    with torch.no_grad():
        assert got["base_clean_accuracy"] == float((target.model(x).argmax(1) == y).float().mean())
    assert res.clean_final_only == ("base", "defended")


def test_a_clean_only_report_reads_back_with_its_figures(tmp_path, target, data):
    res = evaluate_defense(target, make_defense(target), data, attack="none", workdir=None, seed=SEED,
                           batch_size=BS, draws=R, show_progress=False)
    path = res.save(tmp_path / "clean.safetensors", {"classes": list(data.classes)})
    art = load_artifact(path, kind="eval-report")
    back = EvalResult.from_tensors(art.meta, art.tensors).to_json()
    drop = ("seconds",)
    assert {k: v for k, v in back.items() if k not in drop} == {k: v for k, v in res.to_json().items() if k not in drop}
    # a report without the key (written before) keeps the classic layout: its 2R rows are not read as R finals
    old_meta = {k: v for k, v in art.meta.items() if k != "clean_final_only"}
    assert EvalResult.from_tensors(old_meta, art.tensors).clean_final_only == ()


def test_a_side_with_columns_still_gets_its_selection_draws(tmp_path, target, data):
    """With a column to select against, the clean bits are the 2R rows of the old code (final draws first made
    alone, then the selection half), and the defended side is not marked final-only."""
    d = make_defense(target)
    x, y = data.all().x, data.all().y
    ev = Evaluator(target, d, data, eps=0.1, seed=SEED, batch_size=BS, workdir=None, show_progress=False, draws=R)
    final = ev.clean_final("defended")
    full = ev.clean("defended")
    assert torch.equal(full, old_protocol_bits(d, x, y, 2 * R, SEED, BS))
    assert torch.equal(final, full[:R])
    res = evaluate_defense(target, d, data, attack="fgsm", workdir=tmp_path, seed=SEED, batch_size=BS, draws=R,
                           eps=0.1, budgets=Budgets(), show_progress=False, base=False)
    assert res.clean_final_only == ("base",)
    assert torch.equal(res.clean_defended, full)


class NoSkip(nn.Module):
    """A randomized model without ``skip_noise``: classify must make (and drop) the queries it leaves out."""

    randomized = True

    def __init__(self, defense):
        super().__init__()
        self.defense = defense

    def reseed(self, seed):
        self.defense.reseed(seed)

    def forward(self, x):
        return self.defense(x)


@pytest.mark.parametrize("skips", [True, False])
def test_classify_parts_are_the_rows_of_all(target, data, skips):
    """``part="final"``/``"selection"`` are bit for bit the halves of ``part="all"``, also with duplicate images (in
    later batches and within one) and for a model that cannot skip its noise; the final part costs R queries per
    image either way (draws are keyed by image and query ordinal, so none is spent to keep a stream in step)."""
    d = make_defense(target)
    model = d if skips else NoSkip(d)
    b = data.all()
    x = torch.cat([b.x, b.x[:5], b.x[3:4].repeat(3, 1, 1, 1)])  # duplicates in later batches and within one
    y = torch.cat([b.y, b.y[:5], b.y[3:4].repeat(3)])
    full = classify(model, x, y, 2 * R, seed=SEED, batch_size=BS)
    assert torch.equal(full, old_protocol_bits(d, x, y, 2 * R, SEED, BS))
    assert torch.equal(classify(model, x, y, 2 * R, seed=SEED, batch_size=BS, part="final"), full[:R])
    assert torch.equal(classify(model, x, y, 2 * R, seed=SEED, batch_size=BS, part="selection"), full[R:])
    with Counted(d) as counter:
        classify(model, x, y, 2 * R, seed=SEED, batch_size=BS, part="final")
    assert counter.images == R * len(x)


def test_the_clean_bits_are_made_once(target, data):
    """clean_final then clean: a deterministic model's one row is reused, a randomized one gets only its R
    selection draws added (R + R queries per image in all, as one full pass)."""
    for rs, want in ((False, 1), (True, 2 * R)):
        d = make_defense(target, rs=rs)
        ev = Evaluator(target, d, data, seed=SEED, batch_size=BS, workdir=None, show_progress=False, draws=R)
        with Counted(d) as counter:
            ev.clean_final("defended")
            ev.clean("defended")
            ev.clean_final("defended")
        assert counter.images == want * N


def test_a_deterministic_model_is_classified_once(target, data):
    d = make_defense(target, rs=False)
    with Counted(d) as counter:
        res = evaluate_defense(target, d, data, attack="none", workdir=None, seed=SEED, batch_size=BS, draws=R,
                               show_progress=False)
    assert counter.images == N and res.to_json()["draws"] == 1


def test_part_is_checked(target, data):
    with pytest.raises(ValueError, match="part"):
        classify(make_defense(target), data.all().x, data.all().y, 2, part="half")


def test_fallback_features_with_base_run_one_clean_forward(target, data):
    """calibrate-k's feature pass in the hook fallback: ``A(x)`` and ``f(x)`` come from one full forward (it ran a
    partial forward to the layer, then a full one for the base logits: 3 stem passes per image, now 2)."""
    d = make_defense(target)
    d.split.fast, d._checked = False, True
    stem = next(m for m in target.model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor))
    x = data.get(0, 16).x
    with Counted(stem) as counter:
        with torch.no_grad(), block(x, 1):
            feats = d.features(x, with_base=True)
    assert counter.images == 2 * len(x)  # the noisy copy and the clean image, once each
    with torch.no_grad():
        assert torch.equal(feats.base_logits, target.model(x))
        assert torch.equal(feats.a, d.split.head(x)[0])
        with block(x, 1):
            want = d.smoothed_label(x)
        with block(x, 1):
            assert torch.equal(d.features(x, with_base=True).yhat, want)
