"""calibrate-k: the boundary k checked by an independent (literal, hook-based) evaluation, agreement with
``defend-eval --attack none``, seeding, the feature cache, the mask artifact, the plot, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fractions import Fraction

from igd_cli.artifacts import load_artifact, save_artifact
from igd_cli.calibrate import CALIBRATION_STREAM, calibrate_k, passes
from igd_cli.common import open_target
from igd_cli.data import load_dataset
from igd_cli.defense import IGDefense, topk_mask
from igd_cli import noise
from igd_cli.noise import FreshNoise
from igd_cli.scoring import score_stream

from .conftest import cifar_safetensors, digits_safetensors

N_EX, BS = 160, 64  # 3 batches, the last one partial
SIGMA = 0.3  # smoothing strong enough to flip some defended predictions on clean digits


@pytest.fixture(scope="module")
def target():
    return open_target("demo", None, None, device="cpu")


def write_importance(path, target, imp, layer="block3", method="lo-ir", **over):
    meta = {**target.provenance(), "layer": layer, "method": method, "n_neurons": int(imp.shape[0]),
            "data": {"dataset": "digits", "split": "train", "n": 300}, "params": {}, "seconds": 0.0, **over}
    save_artifact(path, "importance", {"importance": imp}, meta)
    return path


@pytest.fixture(scope="module")
def loir(tmp_path_factory, target):
    """A literal LO-IR importance (METHOD.md 1a: one full pass per zeroed channel) on 300 training digits."""
    model = target.model
    d = load_dataset("digits", "train", 300).all()
    imp = torch.zeros(128, 10)
    cnt = torch.bincount(d.y, minlength=10).float()
    with torch.no_grad():
        base = model(d.x).gather(1, d.y[:, None]).squeeze(1)
        for j in range(128):
            h = zeroing(model, "block3", j)
            try:
                out = model(d.x).gather(1, d.y[:, None]).squeeze(1)
            finally:
                h.remove()
            imp[j] = torch.zeros(10).index_add_(0, d.y, (base - out).abs()) / cnt
    return write_importance(tmp_path_factory.mktemp("imp") / "loir.safetensors", target, imp)


@pytest.fixture(scope="module")
def rand_imp(tmp_path_factory, target):
    imp = torch.rand(128, 10, generator=torch.Generator().manual_seed(0))
    return write_importance(tmp_path_factory.mktemp("imp") / "random.safetensors", target, imp, method="random")


def zeroing(model, layer, j):
    """This test's own hook: channel ``j`` of the layer's output set to zero."""
    return model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: out.index_fill(1, torch.tensor([j]), 0))


def literal_per_draw(model, mask, data, *, rs, sigma, tau, seed, draws=1):
    """Defended correct counts by the literal formula with plain forwards and this test's own forward hook
    (independent of igd_cli.defense and igd_cli.layers), one per noise draw: draw r is each image's r-th query
    on the scoring stream of ``seed``, keyed by the image's position and content (the documented contract;
    igd_cli.noise is tested on its own in test_noise.py)."""
    counts = [0] * draws
    with torch.no_grad():
        for b in data.batches(BS):
            x, fresh = b.x, FreshNoise()
            for r in range(draws):
                with noise.images(noise.image_keys(b.index, x), score_stream(seed)):
                    fresh.skip(x, r)
                    v = fresh.sample(x, 1)[0]
                logits = model(x + sigma * v) if rs else model(x)
                s = F.softmax(logits / tau, dim=1) @ mask.float().t()
                h = model.get_submodule("block3").register_forward_hook(
                    lambda _m, _i, out, s=s: torch.einsum("bjhw,bj->bjhw", out, s))
                try:
                    counts[r] += int((model(x).argmax(1) == b.y).sum())
                finally:
                    h.remove()
    return counts


def literal_correct(model, mask, data, *, rs, sigma, tau, seed):
    """The literal count under calibrate-k's noise: each image's first query on the scoring stream of ``seed XOR
    CALIBRATION_STREAM`` (docs/calibrate-k.md), for a defence seeded ``seed``."""
    return literal_per_draw(model, mask, data, rs=rs, sigma=sigma, tau=tau, seed=seed ^ CALIBRATION_STREAM)[0]


def within_tolerance(correct, base, n, points):
    """The pass rule of METHOD.md "Choosing k" written out here (not igd's ``passes``): defended clean accuracy
    ≥ base clean accuracy − ``points`` percentage points, in exact arithmetic."""
    return Fraction(correct, n) >= Fraction(base, n) - Fraction(str(points)) / 100


@pytest.mark.parametrize("rs", [False, True])
@pytest.mark.parametrize("which", ["loir", "rand_imp"])
def test_boundary_k_by_independent_evaluation(request, target, rs, which):
    imp = load_artifact(request.getfixturevalue(which), kind="importance")["importance"]
    data = load_dataset("digits", "test", N_EX)
    d = IGDefense(target.model, "block3", torch.ones(128, 10), sigma=SIGMA, rs=rs, seed=3)
    cal = calibrate_k(d, imp, data, tolerance=0.5, batch_size=BS)
    assert cal.searched and cal.order[0] == 128 and cal.correct[128] == cal.base_correct
    base = int(sum(int((target.model(b.x).argmax(1) == b.y).sum()) for b in data.batches(BS)))
    assert base == cal.base_correct
    k = cal.k
    assert k > 1, "the demo model should need more than one neuron per class"
    kw = dict(rs=rs, sigma=SIGMA, tau=0.01, seed=3)
    at_k = literal_correct(target.model, topk_mask(imp, k), data, **kw)
    below = literal_correct(target.model, topk_mask(imp, k - 1), data, **kw)
    assert at_k == cal.correct[k] and below == cal.correct[k - 1]
    if rs:  # the noise flips predictions here, so a reference drawing other noise would disagree
        others = {literal_per_draw(target.model, topk_mask(imp, kk), data, rs=rs, sigma=SIGMA, tau=0.01, seed=s)[0]
                  for kk in (k, k - 1) for s in (3, 4, 5, 6)}  # raw seed 3: the evaluation's draw 0
        assert others - {at_k, below}
    assert within_tolerance(at_k, base, N_EX, 0.5) and not within_tolerance(below, base, N_EX, 0.5)
    assert [kk for kk, _ in cal.curve] == sorted(cal.correct)
    # every k the search evaluated was judged by the rule: those at or above the result pass, those below fail
    assert all(within_tolerance(c, base, N_EX, 0.5) == (kk >= k) for kk, c in cal.correct.items())


@pytest.mark.parametrize("n, base, tol, ok, not_ok", [
    (200, 190, 0.5, 189, 188),  # 0.5 points of 200 images: one image may be lost, not two
    (160, 150, 0.5, 150, 149),  # 0.8 image: none may be lost
    (1000, 900, 0.5, 895, 894),
    (1000, 900, 1.0, 890, 889),
    (100, 80, 0.0, 80, 79),  # tolerance 0: only the base accuracy or better passes
    (40, 30, 2.5, 29, 28),  # exactly one image: the boundary is inclusive
])
def test_pass_rule_at_the_boundary(n, base, tol, ok, not_ok):
    """``passes`` against the rule written out, at the boundary. Reading --tolerance as a fraction (0.5 = 50
    points), or ten times too loose or too strict, moves the boundary by at least one image in these cases."""
    for correct in (ok, not_ok, base, base + 1, 0):
        assert passes(correct, base, n, tol) == within_tolerance(correct, base, n, tol), (correct, base, n, tol)
    assert within_tolerance(ok, base, n, tol) and not within_tolerance(not_ok, base, n, tol)
    assert within_tolerance(not_ok, base, n, 10 * tol) or tol == 0  # what a 10x looser rule would accept
    assert within_tolerance(not_ok, base, n, 100 * tol) or tol == 0  # what a fraction reading would accept
    assert not within_tolerance(ok, base, n, tol / 10) or ok == base  # what a 10x stricter rule would refuse


def test_tolerance_chooses_the_boundary_image_by_image(target, loir):
    """calibrate-k end to end at a tolerance that is exactly one image of drop: the chosen k loses at most one
    image and k − 1 loses more; a 10x looser or fraction reading of --tolerance would choose a smaller k."""
    imp = load_artifact(loir, kind="importance")["importance"]
    data = load_dataset("digits", "test", 200)
    d = IGDefense(target.model, "block3", torch.ones(128, 10), rs=False)
    cal = calibrate_k(d, imp, data, tolerance=0.5, batch_size=BS)  # 0.5 points of 200 images = 1 image
    k, base = cal.k, cal.base_correct
    curve = {kk: literal_per_draw(target.model, topk_mask(imp, kk), data, rs=False, sigma=0, tau=0.01, seed=0)[0]
             for kk in (k, k - 1)}
    assert curve[k] == cal.correct[k] and curve[k - 1] == cal.correct[k - 1]
    assert base - curve[k] <= 1 and base - curve[k - 1] >= 2
    loose = calibrate_k(d, imp, data, tolerance=5.0, batch_size=BS)  # what a 10x looser reading would run
    assert loose.k < k


def test_cache_recompute_and_seed_give_identical_results(target, rand_imp):
    imp = load_artifact(rand_imp, kind="importance")["importance"]
    data = load_dataset("digits", "test", N_EX)
    d = IGDefense(target.model, "block3", torch.ones(128, 10), sigma=0.2, tau=0.5, seed=1)
    cached = calibrate_k(d, imp, data, batch_size=BS)
    again = calibrate_k(d, imp, data, batch_size=BS)
    streamed = calibrate_k(d, imp, data, batch_size=BS, max_cache_bytes=0)
    assert streamed.info["recomputed_batches"] > 0 and cached.info["recomputed_batches"] == 0
    assert cached.correct == again.correct == streamed.correct and cached.k == streamed.k
    d.reseed(2)
    other = calibrate_k(d, imp, data, batch_size=BS)
    assert other.correct != cached.correct  # the noise does matter at τ = 0.5, σ = 0.2: the check can fail
    assert other.info["noise_seed"] == 2 ^ CALIBRATION_STREAM and cached.info["noise_seed"] == 1 ^ CALIBRATION_STREAM


def test_calibration_draws_none_of_the_evaluations_draws(target, rand_imp):
    """k must not be chosen on a draw the evaluation reports. Every noise tensor calibrate-k draws is
    compared with every one the repeated-draw scoring (selection and final draws, defend-eval's ``classify``) and
    the attacks' stream draw for the same images and seed; today's code calibrated on the evaluation's draw 0."""
    from igd_cli.attacks.base import attack_stream
    from igd_cli.scoring import classify, rows_for

    imp = load_artifact(rand_imp, kind="importance")["importance"]
    data = load_dataset("digits", "test", 40)
    b = data.all()
    d = IGDefense(target.model, "block3", torch.ones(128, 10), sigma=SIGMA, seed=5)
    drawn: list[torch.Tensor] = []
    real = d.sample_noise

    def recording(x):
        v = real(x)
        drawn.extend(v.reshape(-1, *x.shape[1:]))
        return v

    d.sample_noise = recording
    with torch.no_grad():
        calibrate_k(d, imp, data, batch_size=BS)
        calibration, drawn[:] = list(drawn), []
        rows = rows_for(d, "draws", 5)
        keys = noise.image_keys(b.index, b.x)
        classify(d, b.x, b.y, rows, seed=5, keys=keys, batch_size=BS)  # defend-eval's scoring: its queries 0..9
        with noise.images(keys, attack_stream(5, "apgd-eot")):
            for _ in range(3):  # an attack's first queries of the clean images
                d(b.x)
        evaluation = drawn
    assert len(calibration) == len(data) and len(evaluation) == (rows + 3) * len(data)
    key = {v.numpy().tobytes() for v in evaluation}
    assert len(key) == len(evaluation)  # every draw of the evaluation is distinct: the comparison can see reuse
    assert not any(v.numpy().tobytes() in key for v in calibration)


def test_calibration_is_reproducible_and_leaves_the_callers_block_alone(target, rand_imp):
    imp = load_artifact(rand_imp, kind="importance")["importance"]
    data = load_dataset("digits", "test", 40)
    x = data.all().x
    keys = noise.image_keys(data.all().index, x)
    d = IGDefense(target.model, "block3", topk_mask(imp, 20), sigma=SIGMA, tau=0.5, seed=7)
    with torch.no_grad():
        with noise.images(keys, 0):
            before = d(x)  # query 0
            first = calibrate_k(d, imp, data, batch_size=BS)
            after = d(x)  # query 1: calibration neither restarted nor advanced the caller's images
        with noise.images(keys, 0):
            q0, q1 = d(x), d(x)
        again = calibrate_k(d, imp, data, batch_size=BS)
    assert torch.equal(before, q0) and torch.equal(after, q1)
    assert not torch.equal(q0, q1)  # the check can fail: the draws differ
    assert first.correct == again.correct and first.k == again.k


@pytest.mark.parametrize("rs_args", [["--sigma", SIGMA], ["--no-rs"]])
def test_cli_calibrate_agrees_with_defend_eval(cli, tmp_path, target, loir, rs_args):
    """calibrate-k's clean accuracy is one draw on its own noise stream (seed 5 XOR CALIBRATION_STREAM): defend-eval's
    single-draw protocol on that seed gives it exactly; defend-eval with seed 5 scores other draws, each checked
    against the literal defence."""
    mask = tmp_path / "mask.safetensors"
    plot = tmp_path / "cal.png"
    common = ["--n-examples", N_EX, "--batch-size", BS, "--device", "cpu"]
    r = cli("calibrate-k", "--importance", loir, "--out", mask, "--plot", plot, *common, "--seed", 5, *rs_args,
            "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert {"k", "base_clean_accuracy", "clean_accuracy", "curve", "out", "seconds"} <= set(res)
    assert dict((int(k), a) for k, a in res["curve"])[res["k"]] == res["clean_accuracy"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    art = load_artifact(mask, kind="mask")
    m = art["mask"]
    assert m.dtype == torch.uint8 and m.shape == (128, 10) and (m.sum(0) == res["k"]).all()
    meta = art.meta
    rs = rs_args[0] != "--no-rs"
    assert meta["k"] == res["k"] and meta["layer"] == "block3" and meta["method"] == "lo-ir"
    assert meta["importance_sha256"] and meta["importance_file"] == str(loir)
    # σ given explicitly: no ε is involved
    assert meta["defense"] == {"tau": 0.01, "sigma": SIGMA if rs else None, "n_smooth": 1, "rs": rs, "eps": None}
    assert meta["calibration"]["noise_seed"] == (5 ^ CALIBRATION_STREAM if rs else None)
    one = cli("defend-eval", "--mask", mask, "--attack", "none", *common, "--seed", 5 ^ CALIBRATION_STREAM,
              "--protocol", "single-draw", "--json")
    assert one.code == 0, one.err
    assert one.json()["clean_accuracy"] == res["clean_accuracy"]
    assert one.json()["base_clean_accuracy"] == res["base_clean_accuracy"]
    kw = dict(rs=rs, sigma=SIGMA, tau=0.01)
    data = load_dataset("digits", "test", N_EX)
    assert round(res["clean_accuracy"] * N_EX) == literal_correct(target.model, m, data, seed=5, **kw)
    rep = tmp_path / "report.safetensors"
    e = cli("defend-eval", "--mask", mask, "--attack", "none", *common, "--seed", 5, "--report", rep, "--json")
    assert e.code == 0, e.err
    ev = e.json()
    assert ev["base_clean_accuracy"] == res["base_clean_accuracy"]
    assert ev["robust_accuracy"] == {} and ev["base_robust_accuracy"] == {} and ev["worst_case"] is None
    assert ev["n_examples"] == N_EX and ev["eps"] is None  # a clean evaluation never needs ε
    clean = ev["scores"]["defended"]["clean"]
    # defend-eval's final draws are occurrences 0..R-1 of stream 5, by the literal defence
    draws = 5 if rs else 1
    assert clean["per_draw"] == literal_per_draw(target.model, m, data, seed=5, draws=draws, **kw)
    if rs:
        assert ev["draws"] == 5 and ev["randomized"] and len(set(clean["per_draw"])) > 1
        assert ev["clean_accuracy_std"] > 0
    else:
        assert ev["draws"] == 1 and ev["clean_accuracy"] == res["clean_accuracy"] and ev["clean_accuracy_std"] == 0
    report = load_artifact(rep, kind="eval-report")
    assert report.meta["columns"] == ["base:clean", "defended:clean"]
    correct = report["correct"]  # rows x images: final draws correct per image
    assert correct.shape == (2, N_EX)
    assert correct[1].sum().item() / (ev["draws"] * N_EX) == pytest.approx(ev["clean_accuracy"])
    per_class = report.meta["result"]["per_class"]["rows"]["defended:clean"]["accuracy"]
    y = report["y"]
    for c in range(10):
        sel = y == c
        assert per_class[c] == pytest.approx(correct[1][sel].sum().item() / (ev["draws"] * int(sel.sum())))


def test_cli_given_k_and_human_output(cli, tmp_path, target, rand_imp):
    mask = tmp_path / "m.safetensors"
    r = cli("calibrate-k", "--importance", rand_imp, "--out", mask, "--k", 7, "--n-examples", 50, "--no-rs",
            "--device", "cpu", "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["k"] == 7 and [c[0] for c in res["curve"]] == [7] and not res["searched"]
    m = load_artifact(mask, kind="mask")["mask"]
    assert (m.sum(0) == 7).all()
    imp = load_artifact(rand_imp, kind="importance")["importance"]
    assert torch.equal(m.bool(), imp >= imp.topk(7, dim=0).values[-1:])  # the 7 most important per class
    data = load_dataset("digits", "test", 50)
    lit = literal_per_draw(target.model, m, data, rs=False, sigma=0, tau=0.01, seed=0)[0]
    assert res["clean_accuracy"] == lit / 50 and res["clean_accuracy"] < res["base_clean_accuracy"]
    h = cli("calibrate-k", "--importance", rand_imp, "--out", mask, "--n-examples", 50, "--device", "cpu")
    assert h.code == 0 and "chosen" in h.out and "k =" in h.out
    d = cli("defend-eval", "--mask", mask, "--n-examples", 50, "--device", "cpu")
    assert d.code == 0 and "+ IG-Defense" in d.out and "Clean" in d.out


def _bad(tmp_path, target, name, imp, **meta):
    return write_importance(tmp_path / f"{name}.safetensors", target, imp, **meta)


def test_cli_bad_input(cli, tmp_path, target, rand_imp):
    good = load_artifact(rand_imp, kind="importance")["importance"]
    nan = good.clone()
    nan[3, 4] = float("nan")
    cases = {
        "k0": ([rand_imp], ["--k", 0], "between 1 and N"),
        "k129": ([rand_imp], ["--k", 129], "between 1 and N = 128"),
        "nan": ([_bad(tmp_path, target, "nan", nan)], [], "NaN or infinite"),
        "inf": ([_bad(tmp_path, target, "inf", good * float("inf"))], [], "NaN or infinite"),
        "model": ([_bad(tmp_path, target, "fp", good, model_fingerprint="0000111122223333")], [], "fingerprint"),
        "layer": ([_bad(tmp_path, target, "l2", good[:64], layer="block2")], ["--layer", "block3"],
                  "made for layer 'block2', not 'block3'"),
        "nolayer": ([_bad(tmp_path, target, "l9", good, layer="layer9")], [], "does not have"),
        "shape": ([_bad(tmp_path, target, "shape", good[:100])], [], "does not match layer block3"),
        "tolerance": ([rand_imp], ["--tolerance", -1], "--tolerance"),
        "n_smooth": ([rand_imp], ["--n-smooth", 0], "--n-smooth"),
        "tau": ([rand_imp], ["--tau", 0], "--tau"),
        "sigma": ([rand_imp], ["--sigma", -0.1], "--sigma"),
        "n_examples": ([rand_imp], ["--n-examples", 100000], "fewer than"),
    }
    for name, (imp, extra, msg) in cases.items():
        r = cli("calibrate-k", "--importance", *imp, "--out", tmp_path / "o.safetensors", "--device", "cpu",
                "--n-examples", 20, *extra)
        lines = r.err.strip().splitlines()
        assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], (name, r.err)
        assert not (tmp_path / "o.safetensors").exists()
    shard = tmp_path / "shard.safetensors"
    save_artifact(shard, "importance-shard", {"importance": good[:10]},
                  {**target.provenance(), "layer": "block3", "neurons": [0, 10]})
    r = cli("calibrate-k", "--importance", shard, "--out", tmp_path / "o.safetensors", "--device", "cpu")
    assert r.code == 2 and "importance-shard" in r.err


def test_mask_of_another_model_refused(cli, tmp_path, resnet18_path, rand_imp):
    data = cifar_safetensors(tmp_path, n=8)
    args = ["--model", resnet18_path, "--arch", "resnet18", "--dataset", data, "--eps", "8/255", "--device", "cpu"]
    r = cli("calibrate-k", "--importance", rand_imp, "--out", tmp_path / "m.safetensors", *args)
    assert r.code == 2 and "fingerprint" in r.err and len(r.err.strip().splitlines()) == 1
    mask = tmp_path / "demo-mask.safetensors"
    assert cli("calibrate-k", "--importance", rand_imp, "--out", mask, "--k", 3, "--n-examples", 10,
               "--device", "cpu").code == 0
    r = cli("defend-eval", "--mask", mask, *args)
    assert r.code == 2 and "fingerprint" in r.err and len(r.err.strip().splitlines()) == 1


def test_defend_eval_delegates_attacks(cli, tmp_path, rand_imp):
    """With igd_cli.evaluate (the attacks' module) attacks are delegated to it; without it, one error line."""
    import importlib.util

    mask = tmp_path / "m.safetensors"
    assert cli("calibrate-k", "--importance", rand_imp, "--out", mask, "--k", 30, "--n-examples", 10,
               "--device", "cpu").code == 0
    r = cli("defend-eval", "--mask", mask, "--attack", "fgsm", "--n-examples", 10, "--device", "cpu", "--json")
    if importlib.util.find_spec("igd_cli.evaluate") is None:
        assert r.code == 2 and "igd_cli.evaluate" in r.err and len(r.err.strip().splitlines()) == 1
    else:
        assert r.code == 0, r.err
        res = r.json()
        assert {"n_examples", "clean_accuracy", "base_clean_accuracy", "robust_accuracy", "base_robust_accuracy",
                "worst_case"} <= set(res) and set(res["robust_accuracy"]) == {"fgsm"} and res["k"] == 30
        assert res["base_robust_accuracy"]["fgsm"] < res["base_clean_accuracy"]  # the attack really ran


def test_eps_asked_only_where_used(cli, tmp_path, demo):
    """Issue 14.3: a model and data with no known ε (a state-dict file, a tensor file) need --eps only for the
    smoothing noise and the attacks; the error says which option needs it. The mask's probe set reaches the
    defend-eval report."""
    weights = tmp_path / "demo-cnn.pt"
    torch.save(demo.model.state_dict(), weights)
    data = digits_safetensors(tmp_path, "test", 40)
    common = ["--model", weights, "--arch", "demo-cnn", "--dataset", data, "--device", "cpu"]
    imp = tmp_path / "imp.safetensors"
    assert cli("rank", *common, "--method", "random", "--out", imp).code == 0
    r = cli("calibrate-k", *common, "--importance", imp, "--k", 8, "--out", tmp_path / "rs.safetensors")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert "pass --eps" in r.err and "--sigma" in r.err and "--no-rs" in r.err
    mask = tmp_path / "mask.safetensors"
    r = cli("calibrate-k", *common, "--importance", imp, "--k", 8, "--no-rs", "--out", mask, "--json")
    assert r.code == 0, r.err
    cal = r.json()
    report = tmp_path / "report.safetensors"
    r = cli("defend-eval", *common, "--mask", mask, "--no-rs", "--attack", "none", "--report", report, "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert j["n_examples"] == 40 and j["clean_accuracy"] == cal["clean_accuracy"]
    probe = load_artifact(imp).meta["data"]
    assert probe["dataset"] == str(data)
    assert load_artifact(mask).meta["probe"] == probe and j["probe"] == probe
    meta = load_artifact(report).meta
    assert meta["probe"] == probe and meta["eval_identity"]["eps"] is None
    r = cli("defend-eval", *common, "--mask", mask, "--attack", "fgsm")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert "pass --eps" in r.err and "--attack fgsm" in r.err
    r = cli("attack", *common, "--attack", "fgsm", "--out", tmp_path / "adv.safetensors")
    assert r.code == 2 and "pass --eps" in r.err and "the attack's budget" in r.err
