"""Attacks: AutoAttack and APGD through igd equal pyautoattack run directly; transfer variants; ε-ball; CLI."""

from __future__ import annotations

import pytest
import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from igd_cli.artifacts import load_artifact
from igd_cli.attacks import ATTACKS, make_attack, predict
from igd_cli.attacks.apgd import _APGDMargin
from igd_cli.attacks.base import image_seed
from igd_cli.data import load_dataset

EPS = 0.2


@pytest.fixture(scope="module")
def digits16():
    d = load_dataset("digits", "test", 40)
    return d


@pytest.fixture(scope="module")
def correct_batch(demo, digits16):
    """12 clean-correct test images and their positions (pyautoattack attacks only clean-correct ones)."""
    b = digits16.all()
    ok = predict(demo.model, b.x) == b.y
    idx = ok.nonzero().flatten()[:12]
    return b.x[idx], b.y[idx], b.index[idx]


def _in_ball(x_adv, x, eps):
    return bool((x_adv - x).abs().amax() <= eps + 1e-6) and x_adv.min() >= 0 and x_adv.max() <= 1


def test_apgd_ce_matches_pyautoattack_per_image(demo, correct_batch):
    """Fooled images: pyautoattack's perturb with the image's seed; the others: its highest-loss point."""
    x, y, idx = correct_batch
    ours = make_attack("apgd-ce", demo.model, eps=EPS, seed=3, steps=8)(x, y, idx)
    fooled = predict(demo.model, ours) != y
    assert fooled.any() and (~fooled).any()
    for i in range(len(x)):
        s = image_seed(3, int(idx[i]))
        apgd = APGDAttack(demo.model, n_iter=8, norm="Linf", eps=EPS, seed=s, loss="ce", device="cpu")
        if fooled[i]:
            ref = apgd.perturb(x[i:i + 1], y[i:i + 1])
        else:
            torch.manual_seed(s)  # best_loss=True does not seed itself
            ref = apgd.perturb(x[i:i + 1], y[i:i + 1], best_loss=True)
        assert torch.equal(ours[i:i + 1], ref), i


def test_apgd_eot_is_autoattacks_rand_version_per_image(demo, correct_batch):
    """APGD+EoT = AutoAttack's rand version in transfer form: APGD-CE, then APGD-DLR (each with the image's seed,
    as AutoAttack seeds both) on the images CE left; checked image by image against pyautoattack run directly."""
    x, y, idx = correct_batch
    ours = make_attack("apgd-eot", demo.model, eps=0.15, seed=0, steps=3, eot_iter=2)(x, y, idx)
    ce = make_attack("apgd-ce", demo.model, eps=0.15, seed=0, steps=3)(x, y, idx)
    fooled_ce = predict(demo.model, ce) != y
    fooled = predict(demo.model, ours) != y
    assert torch.equal(ours[fooled_ce], ce[fooled_ce])  # the CE stage is APGD-CE itself
    only_dlr = fooled & ~fooled_ce
    assert only_dlr.any() and (~fooled).any(), "budget must leave work for the DLR stage and some survivors"
    for i in only_dlr.nonzero().flatten().tolist():
        s = image_seed(0, int(idx[i]))
        apgd = APGDAttack(demo.model, n_iter=3, norm="Linf", eps=0.15, seed=s, loss="dlr", device="cpu")
        assert torch.equal(ours[i:i + 1], apgd.perturb(x[i:i + 1], y[i:i + 1])), i
    # survivors keep, of the two stages' highest-loss points, the one with the higher DLR loss (written out here)
    def dlr(z, t):
        s = z.sort().values
        other = torch.cat([z[:t], z[t + 1:]]).max()
        return float(-(z[t] - other) / (s[-1] - s[-3] + 1e-12))

    survivors = (~fooled).nonzero().flatten().tolist()
    assert survivors
    for i in survivors:
        s = image_seed(0, int(idx[i]))
        torch.manual_seed(s)
        dlr_best = APGDAttack(demo.model, n_iter=3, norm="Linf", eps=0.15, seed=s, loss="dlr",
                              device="cpu").perturb(x[i:i + 1], y[i:i + 1], best_loss=True)
        with torch.no_grad():
            l_ce, l_dlr = (dlr(demo.model(p)[0], int(y[i])) for p in (ce[i:i + 1], dlr_best))
        want = dlr_best if l_dlr > l_ce else ce[i:i + 1]
        assert torch.allclose(ours[i:i + 1], want, atol=1e-7), i
        assert (ours[i] - x[i]).abs().amax() > 0


def test_apgd_points_do_not_depend_on_the_batch(demo, correct_batch):
    x, y, idx = correct_batch
    atk = make_attack("apgd-t-dlr", demo.model, eps=EPS, seed=0, num_classes=10, steps=4, restarts=1)
    whole = atk(x, y, idx)
    parts = torch.cat([atk(x[i:i + 5], y[i:i + 5], idx[i:i + 5]) for i in range(0, len(x), 5)])
    assert torch.allclose(whole, parts, atol=1e-6)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-cw", "apgd-t-dlr", "apgd-eot"])
def test_transfer_variants_return_perturbed_points_where_they_fail(demo, correct_batch, name):
    x, y, idx = correct_batch
    kw = {"steps": 4} | ({"restarts": 1} if name == "apgd-t-dlr" else {}) | ({"eot_iter": 2} if name == "apgd-eot" else {})
    x_adv = make_attack(name, demo.model, eps=EPS, seed=0, num_classes=10, **kw)(x, y, idx)
    failed = predict(demo.model, x_adv) == y
    assert failed.any()
    moved = (x_adv - x).flatten(1).abs().amax(1) > 0
    assert moved.all()  # never the clean image, also where the attack failed
    assert _in_ball(x_adv, x, EPS)
    # and the AutoAttack-style attack returns the clean image where it fails (the difference the paper notes)
    aa = make_attack("aa", demo.model, eps=EPS, seed=0, num_classes=10, steps=2, queries=5)(x, y, idx)
    aa_failed = predict(demo.model, aa) == y
    assert torch.equal(aa[aa_failed], x[aa_failed])


def test_apgd_cw_uses_the_margin_loss(demo):
    z = torch.randn(6, 10)
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    ap = _APGDMargin(demo.model, n_iter=1, eps=EPS)
    assert ap.loss == "dlr"  # the slot whose loss method it overrides
    lit = torch.stack([torch.cat([z[i, :y[i]], z[i, y[i] + 1:]]).max() - z[i, y[i]] for i in range(6)])
    assert torch.allclose(ap.dlr_loss(z, y), lit)


def test_eot_on_a_deterministic_model_equals_literal_eot(demo, correct_batch):
    x, y, idx = correct_batch
    fast = make_attack("apgd-eot", demo.model, eps=EPS, seed=0, steps=5, eot_iter=3)
    literal = make_attack("apgd-eot", demo.model, eps=EPS, seed=0, steps=5, eot_iter=3, randomized=True)
    assert fast.randomized is False and literal.randomized is True
    assert torch.equal(fast(x, y, idx), literal(x, y, idx))


@pytest.mark.parametrize("name,kw", [
    ("fgsm", {}), ("pgd", {"steps": 3}), ("apgd-ce", {"steps": 3}), ("apgd-cw", {"steps": 3}),
    ("apgd-t-dlr", {"steps": 2, "restarts": 1}), ("apgd-eot", {"steps": 2, "eot_iter": 2}),
    ("rays", {"queries": 60}), ("square", {"queries": 30}), ("aa", {"steps": 2, "queries": 10}),
    ("aa-rand", {"steps": 2, "eot_iter": 2}), ("fab-t", {"steps": 3})])
def test_every_attack_stays_in_the_ball_and_box(demo, correct_batch, name, kw):
    x, y, idx = correct_batch
    x = x[:6].clone()
    x[0, 0, 0, :] = 0.0  # pixels at the box edges
    x[1, 0, :, 0] = 1.0
    x_adv = make_attack(name, demo.model, eps=EPS, seed=1, num_classes=10, **kw)(x, y[:6], idx[:6])
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert _in_ball(x_adv, x, EPS)


def test_registry_matches_the_cli_contract():
    assert list(ATTACKS) == ["aa", "aa-rand", "apgd-ce", "apgd-cw", "apgd-t-dlr", "apgd-eot", "rays", "square",
                             "pgd", "fgsm", "fab-t", "adaptive"]
    from igd_cli.attacks import make_attack as mk
    from igd_cli.errors import IgdError

    with pytest.raises(IgdError):
        mk("apgd-ce", torch.nn.Linear(2, 2), eps=0.1, queries=10)
    with pytest.raises(IgdError):
        mk("rays", torch.nn.Linear(2, 2), eps=0.1, norm="L2")
    a = mk("apgd-t-dlr", torch.nn.Linear(2, 2), eps=0.1)
    assert a.budget == {"steps": 100, "restarts": 3, "eot_iter": 20}  # its EoT samples on a randomized model
    assert mk("rays", torch.nn.Linear(2, 2), eps=0.1).budget == {"queries": 10000}
    assert mk("apgd-eot", torch.nn.Linear(2, 2), eps=0.1).budget["eot_iter"] == 20


def test_cli_attack_writes_a_valid_artifact(cli, tmp_path, demo):
    out = tmp_path / "adv.safetensors"
    r = cli("attack", "--model", "demo", "--attack", "apgd-ce", "--steps", "3", "--n-examples", "10",
            "--out", out, "--json", "--device", "cpu")
    assert r.code == 0, r.err
    j = r.json()
    assert set(j) >= {"out", "attack", "target", "robust_accuracy", "n_examples", "seconds"}
    assert j["attack"] == "apgd-ce" and j["target"] == "base" and j["n_examples"] == 10
    art = load_artifact(out, kind="adversarial", fingerprint=demo.fingerprint)
    assert art["x_adv"].dtype == torch.float32 and art["y"].dtype == torch.int64
    assert torch.equal(art["index"], torch.arange(10))
    m = art.meta
    assert m["attack"] == "apgd-ce" and m["target"] == "base" and m["eps"] == pytest.approx(demo.eps)
    assert m["budget"] == {"steps": 3, "restarts": 1} and m["seed"] == 0
    assert m["data"] == {"dataset": "digits", "split": "test", "n": 10}
    x = load_dataset("digits", "test", 10).all()
    assert _in_ball(art["x_adv"], x.x, demo.eps)
    acc = float((predict(demo.model, art["x_adv"]) == x.y).float().mean())
    assert j["robust_accuracy"] == pytest.approx(acc) == pytest.approx(m["robust_accuracy"])


def test_cli_shards_join_to_the_unsharded_set(cli, tmp_path):
    full, s0, s1 = tmp_path / "f.st", tmp_path / "s0.st", tmp_path / "s1.st"
    base = ["attack", "--attack", "pgd", "--steps", "3", "--n-examples", "9", "--device", "cpu", "--json"]
    assert cli(*base, "--out", full).code == 0
    assert cli(*base, "--shard", "0/2", "--out", s0).code == 0
    r = cli(*base, "--shard", "1/2", "--out", s1)
    assert r.code == 0 and r.json()["n_examples"] == 5
    a, b, c = (load_artifact(p, kind="adversarial") for p in (full, s0, s1))
    assert torch.equal(torch.cat([b["index"], c["index"]]), a["index"])
    assert torch.allclose(torch.cat([b["x_adv"], c["x_adv"]]), a["x_adv"], atol=1e-6)
    assert b.meta["shard"] == [0, 2]


@pytest.mark.parametrize("args,needle", [
    (["--attack", "nope"], "unknown attack"),
    (["--attack", "pgd", "--eps", "abc"], "--eps"),
    (["--attack", "pgd", "--eps", "0"], "--eps"),
    (["--attack", "pgd", "--shard", "2/2"], "--shard"),
    (["--attack", "pgd", "--shard", "x"], "--shard"),
    (["--attack", "rays", "--steps", "3"], "--steps"),
    (["--attack", "pgd", "--steps", "0"], "--steps"),
])
def test_cli_bad_input_is_one_error_line(cli, tmp_path, args, needle):
    r = cli("attack", "--n-examples", "4", "--device", "cpu", "--out", tmp_path / "o.st", *args)
    assert r.code == 2
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.err
    assert not (tmp_path / "o.st").exists()


def test_apgd_eot_gates_its_dlr_stage_on_the_returned_point_under_repeated_draws(demo):
    """DLR runs on every image whose CE point is not wrong in all GATE_DRAWS classifications
    (AutoAttack's rand version re-classifies the returned point), not only where no CE iterate happened to be
    misclassified under one noise draw; on a defence whose noise flips predictions the two rules differ."""
    from igd_cli.defense import IGDefense, topk_mask

    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 40)
    d = IGDefense(demo.model, "block3", mask, sigma=0.15)
    b = load_dataset("digits", "test", 24).all()
    atk = make_attack("apgd-eot", d, eps=0.15, seed=0, num_classes=10, steps=3, eot_iter=2)
    assert atk.randomized and atk._draws() == atk.GATE_DRAWS > 1
    stages, gates = {}, []
    stage, correct = atk._stage, atk._correct_draws

    def spy_stage(x, y, index, loss):
        out = stage(x, y, index, loss)
        stages[loss] = (index.clone(), out)
        return out

    def spy_correct(x_adv, y):
        c = correct(x_adv, y)
        gates.append(c.clone())
        return c

    atk._stage, atk._correct_draws = spy_stage, spy_correct
    x_adv = atk(b.x, b.y, b.index)
    ce_index, ce_points = stages["ce"]
    ce_correct = gates[0]
    assert int(ce_correct.max()) <= atk.GATE_DRAWS
    # the rule: DLR ran on exactly the images whose CE point was correct in at least one draw
    assert stages["dlr"][0].tolist() == ce_index[ce_correct > 0].tolist()
    # ... which includes images one draw may call fooled (right in some draws, wrong in others)
    assert bool(((ce_correct > 0) & (ce_correct < atk.GATE_DRAWS)).any())
    # images wrong in every draw keep their CE point
    assert torch.equal(x_adv[ce_correct == 0], ce_points[ce_correct == 0])


# --- no decision on one draw: restarts, targets and stages on a randomized model -------------------------------

def _near_boundary_defence(demo, sigma=0.15):
    from igd_cli.defense import IGDefense, topk_mask

    return IGDefense(demo.model, "block3", topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)),
                                                     40), sigma=sigma)


class _Flips(torch.nn.Module):
    """A randomized two-class model whose answer on a row is fixed by its content: rows with x[0] = p are right
    with probability p (a Bernoulli per query from a fixed generator)."""

    randomized = True

    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        right = torch.rand(len(x), generator=self.g) < x.flatten(1)[:, 0]
        return torch.stack([right.float(), (~right).float()], dim=1)


def test_draws_pick_keeps_the_point_wrong_in_most_draws():
    from igd_cli.attacks.base import DrawsPick

    y = torch.zeros(200, dtype=torch.int64)
    sure, coin, never = (torch.full((200, 1), p) for p in (1.0, 0.5, 0.0))
    pick = DrawsPick(_Flips(), y, 5)
    pick.offer(sure)
    assert torch.equal(pick.points, sure) and pick.counts is None  # one offer: no query
    pick.offer(coin)
    took = (pick.points == 0.5).flatten()
    # the coin is kept wherever it was wrong in some of 5 draws (sure never is); where it was right in all 5 the
    # tie keeps the earlier point (P = 2^-5 per row)
    assert torch.equal(took, pick.counts < 5) and 0.9 < float(took.float().mean()) < 1
    before = pick.counts.clone()
    pick.offer(never)
    assert (pick.counts == 0).all()  # wrong in every draw beats both, except a point as bad (the earlier kept)
    assert torch.equal((pick.points == 0.0).flatten(), before > 0)
    ties = DrawsPick(_Flips(), y, 5)
    ties.offer(never)
    ties.offer(never + 0.0)
    assert (ties.counts == 0).all()


@pytest.mark.parametrize("name, kw", [("apgd-ce", dict(steps=3, restarts=3)),
                                      ("apgd-eot", dict(steps=2, restarts=2, eot_iter=2)),
                                      ("apgd-t-dlr", dict(steps=2, restarts=2, eot_iter=2))])
def test_every_restart_runs_on_every_image_of_a_randomized_model(demo, monkeypatch, name, kw):
    """A later restart must not skip an image because one noise draw called it fooled: on a randomized model
    every restart (and, for APGD-T, every target) runs on every image."""
    import igd_cli.attacks.apgd as apgd_mod

    d = _near_boundary_defence(demo)
    b = load_dataset("digits", "test", 12).all()
    sizes = []
    real = apgd_mod.transfer_run
    monkeypatch.setattr(apgd_mod, "transfer_run", lambda a, x, y, g: (sizes.append(len(x)), real(a, x, y, g))[1])
    atk = make_attack(name, d, eps=0.15, seed=0, num_classes=10, **kw)
    x_adv = atk(b.x, b.y, b.index)
    runs = kw["restarts"] * (9 if name == "apgd-t-dlr" else 1)
    stages = 2 if name == "apgd-eot" else 1
    assert sizes[:runs] == [12] * runs and len(sizes) >= runs * (stages if name != "apgd-eot" else 1)
    assert (x_adv - b.x).abs().amax() <= 0.15 + 1e-6


def test_targeted_apgd_uses_eot_on_a_randomized_model(demo):
    d = _near_boundary_defence(demo)
    assert make_attack("apgd-t-dlr", d, eps=0.1, eot_iter=7)._make().eot_iter == 7
    assert make_attack("apgd-t-dlr", demo.model, eps=0.1, eot_iter=7)._make().eot_iter == 1


def test_autoattack_keeps_attacking_an_image_one_draw_called_broken(demo, monkeypatch):
    """On a randomized model AutoAttack's next stage runs on every image whose best point so far is right in at
    least one of GATE_DRAWS classifications (one query used to decide), and each image keeps the point wrong in
    the most draws."""
    import igd_cli.attacks.autoattack as aa_mod
    from igd_cli.attacks.base import GATE_DRAWS

    d = _near_boundary_defence(demo)
    b = load_dataset("digits", "test", 16).all()
    counts, seen = [], []
    real = aa_mod.correct_draws

    def spy(model, x, y, draws):
        c = real(model, x, y, draws)
        counts.append(c.clone())
        assert draws == GATE_DRAWS
        return c

    monkeypatch.setattr(aa_mod, "correct_draws", spy)
    atk = make_attack("aa", d, eps=0.15, seed=0, num_classes=10, steps=2, queries=10)
    stages = atk.stages()
    atk.stages = lambda: {k: (lambda f, k: lambda x, y, i: (seen.append(len(x)), f(x, y, i))[1])(f, k)
                          for k, f in stages.items()}
    atk(b.x, b.y, b.index)
    clean, first = counts[0], counts[1]
    assert seen[0] == int((clean > 0).sum())
    best = torch.minimum(clean[clean > 0], first)
    assert seen[1] == int((best > 0).sum())  # images right in one draw of five stay in the run
    assert bool(((best > 0) & (best < GATE_DRAWS)).any())  # and there are such images: the test can fail
