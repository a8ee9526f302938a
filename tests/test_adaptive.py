"""The adaptive attack on IG-Defense: the BPDA switch, each stage pinned where it matters, selection by repeated
draws near the boundary, batch independence, the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igd_cli import noise
from igd_cli.attacks import make_attack, run_attack
from igd_cli.attacks.adaptive import Adaptive
from igd_cli.data import ImageSet
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.errors import IgdError


def _demo_defense(demo, k: int = 8, rs: bool = True, layers=("block3",), seed: int = 0) -> IGDefense:
    """The demo defended at block3 with the mask of its head weights' top k per class (block2, when asked for,
    keeps every neuron)."""
    masks = []
    for layer in layers:
        if layer == "block3":
            masks.append(topk_mask(demo.model.linear.weight.detach().t(), k))
        else:
            masks.append(torch.ones(64, demo.num_classes))
    return IGDefense(demo.model, list(layers), masks, sigma=0.1 if rs else None, rs=rs, seed=seed)


def _digits(n: int):
    from igd_cli.data import load_dataset

    return load_dataset("digits", "test", n)


# --- the BPDA switch on IGDefense ---------------------------------------------------------------------

def _literal(defense: IGDefense, model: nn.Module, x: torch.Tensor, v: torch.Tensor | None, t: float) -> torch.Tensor:
    """The two-pass defence written out (METHOD.md): ŷ = softmax(mean_i f(x + v_i) / t), s = m ŷ,
    prediction h(A(x) ⊙ s), by a forward hook on block3 — independent of IGDefense's split."""
    logits = model(x) if v is None else torch.stack([model(x + vi) for vi in v]).mean(0)
    yhat = F.softmax(logits / t, dim=1)
    s = yhat @ defense.mask.t()  # (B, N)
    layer = dict(model.named_modules())["block3"]
    h = layer.register_forward_hook(lambda m, i, o: o * s.view(*s.shape, *([1] * (o.ndim - 2))))
    try:
        return model(x)
    finally:
        h.remove()


@pytest.mark.parametrize("rs", [False, True])
def test_bpda_gradient_equals_true_gradient_at_tau(demo, rs):
    """With T = τ the relaxed backward is the true one: autograd on the literal two-pass forward agrees; with a
    larger T it differs (the test can fail); the forward is bit-identical with the switch on and off."""
    defense = _demo_defense(demo, rs=rs)
    defense.tau = 1.0  # unsaturated, so the true gradient through ŷ is not zero
    x = _digits(6).all().x.requires_grad_(True)
    w = torch.randn(6, demo.num_classes)

    def grad(fn):
        x.grad = None
        (fn() * w).sum().backward()
        return x.grad.clone()

    keys = noise.image_keys(None, x)

    def block():  # a fresh block: every query below draws the same noise (each image's query 0)
        return noise.images(keys, 0)

    with block():
        v = defense.sample_noise(x) if rs else None
    true = grad(lambda: _literal(defense, demo.model, x, v, defense.tau))
    with block(), defense.bpda(defense.tau):
        bpda = grad(lambda: defense(x))
    assert torch.allclose(bpda, true, rtol=1e-4, atol=1e-6)
    with block(), defense.bpda(20.0):
        relaxed = grad(lambda: defense(x))
    assert not torch.allclose(relaxed, true, rtol=1e-2, atol=1e-4)
    with block():
        off = defense(x)
    with block(), defense.bpda(20.0):
        on = defense(x)
    assert torch.equal(off, on)
    assert defense.bpda_temperature is None  # the switch is off again after the block


def test_bpda_switch_refuses_bad_temperature(demo):
    defense = _demo_defense(demo, rs=False)
    with pytest.raises(IgdError):
        with defense.bpda(0.0):
            pass
    with pytest.raises(IgdError, match="at least 1"):
        Adaptive(defense, eps=0.1, bpda_temperature=0.5)
    with pytest.raises(IgdError, match="only the adaptive"):
        make_attack("apgd-ce", defense, eps=0.1, bpda_temperature=2.0)


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_bpda_backward_at_a_saturated_pseudo_label_is_softmax_at_t(demo, temperature):
    """At τ = 0.01 the pseudo-label is one-hot and its true gradient is zero: the relaxed backward must be that of
    softmax(z / T), computed here by autograd on the formula (not τ's Jacobian rescaled, which is zero too)."""
    defense = _demo_defense(demo, rs=False)
    z = torch.tensor([[3.0, 1.0, 0.5, 2.5] + [0.0] * 6, [0.2, 0.1, 4.0, 2.9] + [1.0] * 6])  # gaps ≥ 100 τ
    w = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    zt = z.clone().requires_grad_(True)
    (defense.pseudo_label(zt) * w).sum().backward()
    assert zt.grad.abs().max() < 1e-12  # saturated: the deployed ŷ passes (almost) nothing back
    zb = z.clone().requires_grad_(True)
    with defense.bpda(temperature):
        y_hat = defense.pseudo_label(zb)
        (y_hat * w).sum().backward()
    zr = z.clone().requires_grad_(True)
    (F.softmax(zr / temperature, dim=1) * w).sum().backward()
    assert torch.equal(y_hat, defense.pseudo_label(z))  # the forward is the deployed one
    assert zr.grad.abs().max() > 1e-2 and torch.allclose(zb.grad, zr.grad, rtol=1e-5, atol=1e-7)


def _trap(n: int = 12, d: int = 48):
    """A defence that only BPDA breaks (every stage of the adaptive attack pinned on it).

    Three hidden units feed the head: ``n0`` = 10 (constant), ``n1 = 16 mean_S1 x − 3``, ``n2 = 12 mean_S2 x − 2``
    (positive in the ε-ball: no dead ReLU); the first pass's logits are ``z = (0.2 n0, n1 − 5, n2 − 4)`` = (2, 0, 0)
    at the clean images (S1, S2 at ½), and at ε = ¼ up to 4 (class 1) and 3 (class 2). The mask of class 0 keeps
    ``n0`` and ``n1``, that of class 1 only ``n0`` (the output is then class 0 whatever x), that of class 2 only
    ``n2``. A direct attack on the defence raises n1 until the first pass says class 1. Attacks on the first pass
    push n1 and n2 up and stop at class 1 (4 > 3): the defence stays right. Its output gradient through the fixed
    mask of class 1 is zero, through the saturated ŷ (τ = 0.01) too; only BPDA shows that lowering n1 (making
    the first pass say class 2) breaks it."""
    fc1, head = nn.Linear(d, 3), nn.Linear(3, 3)
    with torch.no_grad():
        fc1.weight.zero_()
        fc1.weight[1, :16] = 16 / 16
        fc1.weight[2, 16:32] = 12 / 16
        fc1.bias.copy_(torch.tensor([10.0, -3.0, -2.0]))
        head.weight.copy_(torch.diag(torch.tensor([0.2, 1.0, 1.0])))
        head.bias.copy_(torch.tensor([0.0, -5.0, -4.0]))
    model = nn.Sequential(nn.Flatten(), fc1, nn.ReLU(), head).eval()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.uint8)  # (neurons, classes)
    x = torch.rand(n, 1, 4, d // 4, generator=torch.Generator().manual_seed(0))
    x.view(n, -1)[:, :32] = 0.5
    y = torch.zeros(n, dtype=torch.int64)
    data = ImageSet("trap", "test", ["0", "1", "2"], n, lambda i, j: (x[i:j], y[i:j]))
    return model, IGDefense(model, "2", mask, rs=False), data


def _accuracy(defense, x_adv, y) -> float:
    with torch.no_grad():
        return (defense(x_adv).argmax(1) == y).float().mean().item()


def test_only_bpda_breaks_the_trap_and_the_adaptive_attack_does():
    model, defense, data = _trap()
    b = data.all()
    kw = dict(eps=0.25, steps=20, seed=0)
    assert _accuracy(defense, b.x, b.y) == 1.0
    direct = run_attack(make_attack("apgd-ce", defense, **kw), data, show_progress=False)
    first_pass = run_attack(make_attack("apgd-eot", model, **kw), data, show_progress=False)  # stage 1 alone
    with torch.no_grad():
        assert (model(first_pass.x_adv).argmax(1) == 1).all()  # stage 1 flips the first pass ...
    assert _accuracy(defense, direct.x_adv, b.y) == 1.0 and _accuracy(defense, first_pass.x_adv, b.y) == 1.0
    adaptive = run_attack(Adaptive(defense, **kw), data, show_progress=False)
    assert _accuracy(defense, adaptive.x_adv, b.y) == 0.0  # ... and BPDA takes it to the class that breaks it
    # the same attack without the relaxed backward is stuck where stage 1 left it
    plain = Adaptive(defense, **kw)
    plain.temperature = None  # what bpda(None) would do: the deployed, saturated gradient
    stuck = run_attack(plain, data, show_progress=False)
    assert _accuracy(defense, stuck.x_adv, b.y) == 1.0


def test_stage_two_runs_eot_on_a_randomized_defence(demo):
    """Stage 2 queries the whole defence ``eot_iter`` times per gradient (APGD's first gradient and every step),
    under BPDA; a stage 2 without EoT would make a fifth of these queries."""
    defense = _demo_defense(demo)
    data = _digits(4)
    steps, eot = 3, 5
    grads = []
    real = defense.forward

    def counting(x):
        if torch.is_grad_enabled() and defense.bpda_temperature is not None:
            grads.append(defense.bpda_temperature)
        return real(x)

    defense.forward = counting
    run_attack(Adaptive(defense, eps=0.2, steps=steps, eot_iter=eot, bpda_temperature=7.0), data,
               show_progress=False)
    # + 1: the check that the surrogate has a gradient (one forward in a noise block of its own)
    assert grads == [7.0] * (eot * (steps + 1) + 1)


def test_smoothed_first_pass_draws_the_defence_noise(demo):
    """Stage 1's model is mean_i f(x + v_i) with v from the defence's stream: the replayed draw reproduces it."""
    defense = _demo_defense(demo)
    x = _digits(4).all().x
    keys = noise.image_keys(None, x)
    with noise.images(keys, 0):
        v = defense.sample_noise(x)
    want = torch.stack([demo.model(x + vi) for vi in v]).mean(0)
    with noise.images(keys, 0):
        assert torch.allclose(defense.first_pass(x), want, atol=1e-5)
        assert not torch.allclose(defense.first_pass(x), want, atol=1e-3)  # fresh noise on the next query


# --- the attack ---------------------------------------------------------------------------------------

def test_k_equals_n_without_smoothing_is_apgd_on_the_base_model(demo):
    """A k = N mask without smoothing is the base model (s = 1): the adaptive attack gives the same points as on
    the base model, which are apgd-eot's (stage 1) except where stage 2 fools an image apgd-eot did not."""
    defense = IGDefense(demo.model, "block3", torch.ones(128, demo.num_classes), rs=False)
    data = _digits(12)
    kw = dict(eps=0.2, seed=3, steps=5)
    on_def = run_attack(Adaptive(defense, **kw), data, batch_size=12, show_progress=False)
    on_base = run_attack(Adaptive(demo.model, **kw), data, batch_size=12, show_progress=False)
    assert torch.allclose(on_def.x_adv, on_base.x_adv, atol=1e-5)
    eot = run_attack(make_attack("apgd-eot", demo.model, **kw), data, batch_size=12, show_progress=False)
    with torch.no_grad():
        fooled = demo.model(eot.x_adv).argmax(1) != eot.y
        fooled_adaptive = demo.model(on_base.x_adv).argmax(1) != eot.y
    assert fooled.any() and (~fooled).any()
    same = (on_base.x_adv - eot.x_adv).flatten(1).abs().amax(1) <= 1e-6
    assert same[fooled].all()
    assert (same | (fooled_adaptive & ~fooled)).all()


def _gated(c: int = 3, d: int = 48, seed: int = 0):
    """A defence whose gradient is masked through a saturated gate: the mask keeps, for class c, only a bias-only
    "anchor" neuron, so the defended logits are 10·ŷ (constant in x but through ŷ, whose softmax at τ = 0.01 is
    saturated: exactly one-hot, zero gradient); the prediction is the first pass's, f = argmax u_c·x."""
    g = torch.Generator().manual_seed(seed)
    fc1 = nn.Linear(d, 2 * c)
    head = nn.Linear(2 * c, c)
    with torch.no_grad():
        fc1.weight.zero_()
        fc1.weight[:c] = torch.randn(c, d, generator=g)
        fc1.bias.fill_(30.0)
        head.weight.zero_()
        head.bias.zero_()
        for k in range(c):
            head.weight[k, k] = head.weight[k, c + k] = 1.0
    model = nn.Sequential(nn.Flatten(), fc1, nn.ReLU(), head).eval()
    mask = torch.zeros(2 * c, c, dtype=torch.uint8)
    mask[c + torch.arange(c), torch.arange(c)] = 1
    x = torch.rand(400, 1, 4, d // 4, generator=g)
    with torch.no_grad():
        z = model(x)
    top2 = z.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > 1.5).nonzero().flatten()[:24]  # saturated ŷ at the clean points
    y = z.argmax(1)
    xs, ys = x[keep], y[keep]
    data = ImageSet("gated", "test", [str(i) for i in range(c)], len(keep), lambda i, j: (xs[i:j], ys[i:j]))
    return model, IGDefense(model, "2", mask, rs=False), data


def test_adaptive_breaks_a_gradient_masking_gate_where_direct_apgd_fails():
    model, defense, data = _gated()
    x, y = data.all().x, data.all().y
    with torch.no_grad():
        assert torch.equal(defense(x).argmax(1), y)  # the defence predicts like its first pass
    x.requires_grad_(True)
    F.cross_entropy(defense(x), y).backward()
    assert torch.count_nonzero(x.grad) == 0  # the gate hides the gradient entirely
    eps = 0.25
    direct = run_attack(make_attack("apgd-ce", defense, eps=eps, steps=20), data, show_progress=False)
    adaptive = run_attack(Adaptive(defense, eps=eps, steps=20), data, show_progress=False)
    with torch.no_grad():
        acc_direct = (defense(direct.x_adv).argmax(1) == y).float().mean().item()
        acc_adaptive = (defense(adaptive.x_adv).argmax(1) == y).float().mean().item()
    assert acc_direct >= 0.9
    assert acc_adaptive <= 0.1


@pytest.mark.parametrize("layers", [("block3",), ("block2", "block3")])
def test_eps_ball_and_unit_box(demo, layers):
    defense = _demo_defense(demo, layers=layers)
    data = _digits(6)
    eps = 0.2
    res = run_attack(Adaptive(defense, eps=eps, steps=3, eot_iter=2), data, show_progress=False)
    x = data.all().x
    assert (res.x_adv - x).abs().max() <= eps + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert not torch.equal(res.x_adv, x)


def test_batch_independence(demo):
    """An image's point does not depend on its batch: batch sizes 1 and the default, and a shuffled order."""
    defense = _demo_defense(demo)
    data = _digits(4)
    atk = Adaptive(defense, eps=0.2, seed=1, steps=2, eot_iter=2)
    whole = run_attack(atk, data, show_progress=False)
    ones = run_attack(atk, data, batch_size=1, show_progress=False)
    order = torch.tensor([2, 0, 3, 1])
    shuffled = run_attack(atk, data, batch_size=3, positions=order, show_progress=False)
    assert torch.allclose(whole.x_adv, ones.x_adv, atol=1e-5)
    assert torch.allclose(whole.x_adv[order], shuffled.x_adv, atol=1e-5)


def test_selection_keeps_the_point_wrong_in_most_draws_near_the_boundary(demo):
    """Per image the kept point is the candidate wrong in the most of GATE_DRAWS fresh classifications (ties: the
    earliest), on candidates near the boundary (σ = 0.4: each is right in some draws and wrong in others), where
    one draw would often choose the other point."""
    from igd_cli.attacks.base import GATE_DRAWS, attack_stream

    defense = IGDefense(demo.model, "block3", topk_mask(demo.model.linear.weight.detach().t(), 8), sigma=0.4)
    data = _digits(40)
    b = data.all()
    x, y = b.x, b.y
    near = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    atk = Adaptive(defense, eps=0.2, steps=2, eot_iter=1)
    keys = noise.image_keys(b.index, x)
    with noise.images(keys, attack_stream(0, "adaptive")):  # as inside the attack
        kept = atk.select(x, y, [x.clone(), near])
    with noise.images(keys, attack_stream(0, "adaptive")), torch.no_grad():  # the same draws, by hand
        right = [torch.stack([defense(p).argmax(1) == y for _ in range(GATE_DRAWS)]) for p in (x, near)]
    counts = [r.sum(0) for r in right]
    want = torch.where(counts[1] < counts[0], 1, 0)
    assert torch.equal(kept, torch.stack([x, near])[want, torch.arange(len(x))])
    undecided = [((r.sum(0) > 0) & (r.sum(0) < GATE_DRAWS)) for r in right]
    assert (undecided[0] & undecided[1]).sum() >= 5  # near the boundary: the draws disagree
    one_draw = torch.where(right[1][0].long() < right[0][0].long(), 1, 0)
    assert (one_draw != want).any()  # a single draw would keep another point: the test can fail
    assert (want == 1).any() and (want == 0).any()


# --- IW-WC's tenth column: iw_wc_paper beside worst_case, the marks in tables -------------------------------

def _bits(rows: int, n: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, n, generator=g) < p


def _result(adaptive_p: float, n: int = 60):
    from igd_cli.evaluate import DIRECT_RUN_ORDER, TRANSFER, EvalResult

    y = torch.zeros(n, dtype=torch.int64)
    res = EvalResult(y, torch.arange(n), ["a"], torch.ones(1, n, dtype=torch.bool), _bits(10, n, 0.98, 0),
                     mode="iw-wc", randomized=True)
    for i, a in enumerate(TRANSFER):
        res.base[f"tr-{a}"] = _bits(1, n, 0.7, 10 + i)
        res.defended[f"tr-{a}"] = _bits(10, n, 0.8, 20 + i)
    for i, a in enumerate(DIRECT_RUN_ORDER):
        res.defended[a] = _bits(10, n, 0.85, 30 + i)
    res.defended["adaptive"] = _bits(10, n, adaptive_p, 40)
    return res


def test_iw_wc_paper_is_the_worst_case_without_the_adaptive_column():
    from igd_cli.evaluate import table_cells
    from igd_cli.scoring import Score, final_of_selected

    res = _result(0.3)
    j = res.to_json()
    nine = [res.clean_defended, *[b for k, b in res.defended.items() if k != "adaptive"]]
    want = Score.of(final_of_selected(nine))
    assert j["iw_wc_paper"] == pytest.approx(want.mean) and j["iw_wc_paper_std"] == pytest.approx(want.std)
    assert j["iw_wc_paper_majority"] == pytest.approx(want.majority)
    assert j["iw_wc_paper_all_draws"] == pytest.approx(want.all_draws)
    assert j["worst_case"] < j["iw_wc_paper"] and j["beyond_paper"] == ["adaptive"]
    cells = table_cells(j)
    names = [r[0] for r in cells.rows]
    assert "Adaptive‡" in names and any("paper's nine" in r for r in names)
    assert any("beyond the paper" in note for note in cells.notes)
    # without the tenth column (a model that is not an IG-Defense) the paper's worst case is the worst case
    del res.defended["adaptive"]
    j = res.to_json()
    assert j["iw_wc_paper"] == j["worst_case"] and j["beyond_paper"] == []
    assert not any("beyond the paper" in note for note in table_cells(j).notes)


# --- the audit check ---------------------------------------------------------------------------------------

def test_audit_flags_an_adaptive_column_that_lowers_the_worst_case_beyond_noise():
    from igd_cli.audit.adaptive import adaptive_vs_nine, paired

    res = _result(0.3)
    nine = {k: b for k, b in res.defended.items() if k != "adaptive"}
    strong = adaptive_vs_nine(res.clean_defended, nine, res.defended["adaptive"])
    assert strong.verdict == "flag" and strong.figures["lowered_by"] > 2 * strong.figures["standard_error"]
    assert len(strong.figures["adaptive_stronger_than"]) == 9
    # the adaptive column equal to one of the nine lowers nothing
    same = adaptive_vs_nine(res.clean_defended, nine, nine["aa"])
    assert same.verdict == "ok" and same.figures["lowered_by"] == 0
    # lowering the worst case on one image of 60 is within its noise
    one = nine["aa"].clone()
    w9 = final_of_selected_of(res.clean_defended, nine)
    i = int(w9.float().mean(0).argmax())
    one[:, i] = False
    small = adaptive_vs_nine(res.clean_defended, nine, one)
    assert small.figures["lowered_by"] > 0 and small.verdict == "ok"
    # the paired standard error written out
    a, b = torch.tensor([[1, 1, 0, 1]]), torch.tensor([[0, 1, 0, 0]])
    m, se = paired(a, b)
    assert m == pytest.approx(0.5) and se == pytest.approx((1 / 3) ** 0.5 / 2)


def final_of_selected_of(clean, nine):
    from igd_cli.scoring import final_of_selected

    return final_of_selected([clean, *nine.values()])


# --- the CLI -------------------------------------------------------------------------------------------------

def test_cli_attack_adaptive_and_its_option(cli, tmp_path):
    from igd_cli.artifacts import read_metadata, save_artifact
    from igd_cli.common import open_target

    target = open_target("demo", None, None, "Linf", "cpu")
    mask = topk_mask(target.model.linear.weight.detach().t(), 8)
    meta = {**target.provenance(), "layer": "block3", "k": 8, "importance_file": "none", "importance_sha256": "0",
            "method": "head", "defense": {"tau": 0.01, "sigma": 0.1, "n_smooth": 1, "rs": True, "eps": 0.2}}
    m = save_artifact(tmp_path / "mask.safetensors", "mask", {"mask": mask}, meta)
    out = tmp_path / "adv.safetensors"
    common = ["--mask", m, "--n-examples", 2, "--steps", 2, "--eot-iter", 1, "--device", "cpu"]
    r = cli("attack", "--attack", "adaptive", "--out", out, "--bpda-temperature", 2, *common, "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert j["budget"]["bpda_temperature"] == 2.0 and read_metadata(out)["budget"]["bpda_temperature"] == 2.0
    for bad in (["--attack", "adaptive", "--bpda-temperature", "0.5"], ["--attack", "apgd-ce", "--bpda-temperature", "2"]):
        r = cli("attack", *bad, "--out", tmp_path / "x.safetensors", *common)
        assert r.code == 2 and r.err.startswith("error: --bpda-temperature"), r.err
    r = cli("defend-eval", "--mask", m, "--attack", "none", "--bpda-temperature", "2", "--n-examples", 3)
    assert r.code == 2 and r.err.startswith("error: --bpda-temperature"), r.err
    r = cli("pipeline", "--bpda-temperature", "0.5", "--out", tmp_path / "run")
    assert r.code == 2 and r.err.startswith("error: --bpda-temperature") and not (tmp_path / "run").exists(), r.err
    r = cli("defend-eval", "--mask", m, "--attack", "adaptive", "--bpda-temperature", "3", *common[2:], "--json",
            "--workdir", tmp_path / "wd")
    assert r.code == 0, r.err
    assert r.json()["bpda_temperature"] == 3.0 and "adaptive" in r.json()["robust_accuracy"]
