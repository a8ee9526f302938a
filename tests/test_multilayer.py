"""IG-Defense masking several layers at once: the defended forward against the literal formula (real ResNet-18 with
layer3 + layer4, layers with skip connections across them, the hook fallback), gradients, the mask artifact of
several layers, calibrate-k on the shared fraction k/N and ``--k LAYER=K``, and the commands that take ``--mask``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from igd_cli.artifacts import load_artifact, save_artifact
from igd_cli.calibrate import CALIBRATION_STREAM, calibrate_k
from igd_cli.common import open_target
from igd_cli.data import load_dataset
from igd_cli.defense import IGDefense, load_defense, save_mask, topk_mask
from igd_cli.errors import IgdError

from .noise_blocks import block, first_draws
from .varied_images import cifar_images, n_classes_predicted


def literal(model, layers, masks, x, *, tau=0.01, noise=None):
    """METHOD.md steps 2-3 for several layers, written out with plain forwards and raw forward hooks: ŷ from (noisy)
    full passes, then one full forward in which every listed layer's output is multiplied by its s_l = m_l ŷ."""
    mean_logits = model(x) if noise is None else torch.stack([model(x + v) for v in noise]).mean(0)
    yhat = F.softmax(mean_logits / tau, dim=1)
    handles = []
    for name, m in zip(layers, masks):
        s = yhat @ m.float().t()

        def hook(_mod, _inp, out, s=s):
            return out * s.reshape(*s.shape, *([1] * (out.ndim - 2)))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def content_noise(seed, x, sigma, n_smooth=1):
    return first_draws(seed, x, sigma, n_smooth)


def rmask(n, c, k, seed):
    return topk_mask(torch.rand(n, c, generator=torch.Generator().manual_seed(seed)), k)


def close(a, b):
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


class SkipNet(nn.Module):
    """A skip connection jumps over both masked layers (``a`` and ``b``): the fx tail must carry it."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(12, 16, 3, padding=1), nn.ReLU())
        self.proj = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        h = self.stem(x)
        out = self.b(self.a(h)) + self.proj(h)
        return self.fc(out.mean((2, 3)))


class Untraceable(SkipNet):
    """Data-dependent control flow: torch.fx cannot trace it, so the defence runs on hooks only."""

    def forward(self, x):
        h = self.stem(x)
        if float(h.sum()) > -1e30:
            h = h * 1.0
        out = self.b(self.a(h)) + self.proj(h)
        return self.fc(out.mean((2, 3)))


def small_net(cls, seed=0):
    torch.manual_seed(seed)
    return cls().eval()


LAYER_SETS = {
    "layer3+layer4": (["layer3", "layer4"], [256, 512]),
    # each masked layer sits inside a residual block: the block's skip connection jumps over it
    "skips": (["layer2.1.conv1", "layer4.0.bn2"], [128, 512]),
}


@pytest.mark.parametrize("which", sorted(LAYER_SETS))
@pytest.mark.parametrize("rs", [False, True])
def test_resnet18_several_layers_match_literal_formula(resnet18, which, rs):
    model = resnet18.model
    layers, sizes = LAYER_SETS[which]
    masks = [rmask(n, 10, n // 8, seed=i) for i, n in enumerate(sizes)]
    x = cifar_images(model, 6)  # real images of several classes: every image gets its own weights
    assert n_classes_predicted(model, x) >= 4
    noise = content_noise(11, x, 4 / 255) if rs else None
    with torch.no_grad():
        d = IGDefense(model, layers, masks, sigma=4 / 255, rs=rs)
        assert d.split.fast and d.split.name == layers[0] and d.layer == "+".join(layers)
        want = literal(model, layers, masks, x, noise=noise)
        with block(x, 11):
            assert close(d(x), want)
        with block(x, 11):
            assert close(d.masked_tail(d.features(x)), want)  # the calibrate-k / clean-accuracy route
        # the given order does not matter: the split is at the layer that runs first
        r = IGDefense(model, layers[::-1], masks[::-1], sigma=4 / 255, rs=rs)
        with block(x, 11):
            assert r.split.name == layers[0] and close(r(x), want)
        # the test can fail: masking only one of the layers gives other logits
        one = literal(model, layers[1:], masks[1:], x, noise=noise)
        assert not torch.allclose(want, one, atol=1e-3)


def test_resnet18_hook_fallback_and_gradients(resnet18):
    model = resnet18.model
    layers, sizes = LAYER_SETS["layer3+layer4"]
    masks = [rmask(n, 10, n // 4, seed=3 + i) for i, n in enumerate(sizes)]
    x = cifar_images(model, 3)
    assert n_classes_predicted(model, x) >= 2
    slow = IGDefense(model, layers, masks, tau=1.0, sigma=0.05, seed=4)
    slow.split.fast = False
    fast = IGDefense(model, layers, masks, tau=1.0, sigma=0.05, seed=4)
    noise = content_noise(4, x, 0.05)
    w = torch.randn(3, 10, generator=torch.Generator().manual_seed(9))
    grads = []
    for d in (fast, slow, None):
        xi = x.clone().requires_grad_(True)
        with block(x, 4):
            out = d(xi) if d is not None else literal(model, layers, masks, xi, tau=1.0, noise=noise)
        (out * w).sum().backward()
        grads.append((out.detach(), xi.grad))
    assert not slow.split.fast and fast.split.fast
    (o_fast, g_fast), (o_slow, g_slow), (o_lit, g_lit) = grads
    assert close(o_fast, o_lit) and close(o_slow, o_lit)
    assert g_lit.abs().sum() > 0
    assert torch.allclose(g_fast, g_lit, atol=1e-5, rtol=1e-3) and torch.allclose(g_slow, g_lit, atol=1e-5, rtol=1e-3)
    with torch.no_grad(), block(x, 4):
        assert close(slow.masked_tail(slow.features(x)), o_lit)


@pytest.mark.parametrize("cls", [SkipNet, Untraceable])
@pytest.mark.parametrize("rs", [False, True])
def test_skip_across_masked_layers_and_untraceable_model(cls, rs):
    model = small_net(cls)
    masks = [rmask(12, 10, 3, seed=1), rmask(16, 10, 5, seed=2)]
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = content_noise(7, x, 0.2, n_smooth=2) if rs else None
    with torch.no_grad():
        d = IGDefense(model, ["a", "b"], masks, sigma=0.2, n_smooth=2, rs=rs, tau=0.5)
        with block(x, 7):
            got = d(x)
        assert d.split.fast == (cls is SkipNet)
        want = literal(model, ["a", "b"], masks, x, tau=0.5, noise=noise)
        assert close(got, want)
        with block(x, 7):
            assert close(d.masked_tail(d.features(x)), want)
        assert not torch.allclose(want, literal(model, ["b"], masks[1:], x, tau=0.5, noise=noise), atol=1e-4)


def test_one_layer_is_the_one_item_case(demo):
    model = demo.model
    m = rmask(128, 10, 9, seed=0)
    x = load_dataset("digits", "test", 12).all().x
    with torch.no_grad():
        with block(x, 2):
            a = IGDefense(model, "block3", m, sigma=0.1)(x)
        with block(x, 2):
            b = IGDefense(model, ["block3"], [m], sigma=0.1)(x)
    assert torch.equal(a, b)
    assert IGDefense(model, ["block3"], [m], rs=False).k == 9


def test_bad_layer_lists_refused(demo):
    m2, m3 = rmask(64, 10, 4, seed=0), rmask(128, 10, 4, seed=1)
    with pytest.raises(IgdError, match="listed twice"):
        IGDefense(demo.model, ["block3", "block3"], [m3, m3], rs=False)
    with pytest.raises(IgdError, match="nest"):
        IGDefense(demo.model, ["block3", "block3.0"], [m3, m3], rs=False)
    with pytest.raises(IgdError, match="one mask per layer"):
        IGDefense(demo.model, ["block2", "block3"], [m2], rs=False)
    d = IGDefense(demo.model, ["block2", "block3"], [m3, m2], rs=False)  # masks swapped: sizes do not fit
    with pytest.raises(IgdError, match="mask has 128 neurons but layer block2 outputs 64"):
        d(torch.rand(2, 1, 8, 8))


@pytest.fixture(scope="module")
def target():
    return open_target("demo", None, None, device="cpu")


def write_importance(path, target, imp, layer, method="random"):
    meta = {**target.provenance(), "layer": layer, "method": method, "n_neurons": int(imp.shape[0]),
            "data": {"dataset": "digits", "split": "train", "n": 100}, "params": {}, "seconds": 0.0}
    save_artifact(path, "importance", {"importance": imp}, meta)
    return path


@pytest.fixture(scope="module")
def imps(tmp_path_factory, target):
    folder = tmp_path_factory.mktemp("imps")
    out = {}
    for layer, n, seed in (("block2", 64, 0), ("block3", 128, 1)):
        imp = torch.rand(n, 10, generator=torch.Generator().manual_seed(seed))
        out[layer] = (write_importance(folder / f"{layer}.safetensors", target, imp, layer), imp)
    return out


def test_mask_artifact_of_several_layers(tmp_path, target, imps):
    (p2, i2), (p3, i3) = imps["block2"], imps["block3"]
    path = save_mask(tmp_path / "m.safetensors", target, ["block2", "block3"], [topk_mask(i2, 3), topk_mask(i3, 6)],
                     k=[3, 6], importance_path=[p2, p3], importance_meta=[{"method": "random"}] * 2,
                     defense={"tau": 0.01, "sigma": 0.1, "n_smooth": 1, "rs": True})
    art = load_artifact(path, kind="mask")
    assert set(art.tensors) == {"block2", "block3"} and art.meta["layers"] == ["block2", "block3"]
    assert art.meta["k"] == {"block2": 3, "block3": 6} and art.meta["layer"] == "block2+block3"
    d = load_defense(target, path)
    assert d.layers == ("block2", "block3") and d.k == {"block2": 3, "block3": 6}
    assert torch.equal(d.masks[1], topk_mask(i3, 6).float())
    # a one-item list writes the one-layer format (tensor "mask"), which every igd reads
    one = save_mask(tmp_path / "one.safetensors", target, ["block3"], [topk_mask(i3, 6)], k=[6],
                    importance_path=[p3], importance_meta=[{"method": "random"}], defense={"rs": False, "tau": 0.01})
    art1 = load_artifact(one, kind="mask")
    assert set(art1.tensors) == {"mask"} and art1.meta["layer"] == "block3" and art1.meta["k"] == 6
    assert "layers" not in art1.meta
    # refusals, one line each
    meta = dict(art.meta)
    raw = tmp_path / "lacks.safetensors"  # written by another tool: block3's tensor is missing
    save_file({"block2": art["block2"]}, str(raw), metadata={k: json.dumps(v) for k, v in meta.items()})
    with pytest.raises(IgdError, match="lacks tensor"):
        load_defense(target, raw)
    for layers, tensors, msg in ((["block2", "block9"], {"block2": art["block2"], "block9": art["block3"]},
                                  "does not have"),
                                 (["block3", "block3.0"], {"block3": art["block3"], "block3.0": art["block3"].clone()},
                                  "nest"),
                                 (["block2", "block3"], {"block2": art["block2"], "block3": art["block3"][:, :5]},
                                  "does not fit a model with 10 classes")):
        bad = tmp_path / "bad.safetensors"
        save_artifact(bad, "mask", tensors, {**meta, "layers": layers})
        with pytest.raises(IgdError, match=msg):
            load_defense(target, bad)


def schedule_ks(k, sizes):
    """The documented shared fraction, written out: k_l = ceil(k · N_l / N) with N the widest layer."""
    n = max(sizes.values())
    return {layer: -(-k * size // n) for layer, size in sizes.items()}


def literal_correct(model, layers, masks, data, *, sigma, seed):
    return literal_per_draw(model, layers, masks, data, sigma=sigma, seed=seed, draws=1)[0]


def literal_per_draw(model, layers, masks, data, *, sigma, seed, draws):
    """Correct counts of the literal defence under each image's queries 0..draws-1 on the scoring stream of
    ``seed`` (the documented noise contract: draws keyed by the image's position and content and the ordinal)."""
    from igd_cli import noise
    from igd_cli.noise import FreshNoise
    from igd_cli.scoring import score_stream

    counts = [0] * draws
    with torch.no_grad():
        for b in data.batches(64):
            with noise.images(noise.image_keys(b.index, b.x), score_stream(seed)):
                for r in range(draws):
                    v = FreshNoise().sample(b.x, 1) * sigma
                    counts[r] += int((literal(model, layers, masks, b.x, noise=v).argmax(1) == b.y).sum())
    return counts


def within_tolerance(correct, base, n, points):
    """calibrate-k's pass rule written out (not igd's ``passes``): defended accuracy ≥ base accuracy − ``points``
    percentage points, compared exactly."""
    from fractions import Fraction

    return Fraction(correct, n) >= Fraction(base, n) - Fraction(str(points)) / 100


def test_calibrate_several_layers_boundary_by_literal_evaluation(target, imps):
    (_, i2), (_, i3) = imps["block2"], imps["block3"]
    data = load_dataset("digits", "test", 160)
    layers, sizes = ["block2", "block3"], {"block2": 64, "block3": 128}
    d = IGDefense(target.model, layers, [torch.ones(64, 10), torch.ones(128, 10)], sigma=0.1, seed=3)
    cal = calibrate_k(d, [i2, i3], data, tolerance=0.5, batch_size=64)
    assert cal.searched and cal.schedule.reference == "block3" and cal.n_neurons == 128
    assert cal.ks == schedule_ks(cal.k, sizes) and cal.k > 1
    base = int(sum(int((target.model(b.x).argmax(1) == b.y).sum()) for b in data.batches(64)))
    for kk in (cal.k, cal.k - 1):
        ks = schedule_ks(kk, sizes)
        got = literal_correct(target.model, layers, [topk_mask(i2, ks["block2"]), topk_mask(i3, ks["block3"])],
                              data, sigma=0.1, seed=3 ^ CALIBRATION_STREAM)  # calibrate-k's own noise stream
        assert got == cal.correct[kk]
    assert within_tolerance(cal.correct[cal.k], base, 160, 0.5)
    assert not within_tolerance(cal.correct[cal.k - 1], base, 160, 0.5)
    # a fixed layer keeps its k while the other is searched
    fixed = calibrate_k(d, [i2, i3], data, tolerance=0.5, batch_size=64, k={"block2": 60})
    assert fixed.schedule.reference == "block3" and len(fixed.correct) > 2
    # the search masked block2 with its 60 neurons and block3 with k: checked by the literal defence at the
    # result and the k below it
    for kk in (fixed.k, fixed.k - 1):
        got = literal_correct(target.model, layers, [topk_mask(i2, 60), topk_mask(i3, kk)], data, sigma=0.1,
                              seed=3 ^ CALIBRATION_STREAM)
        assert got == fixed.correct[kk]
    assert within_tolerance(fixed.correct[fixed.k], base, 160, 0.5)
    assert not within_tolerance(fixed.correct[fixed.k - 1], base, 160, 0.5)
    # block2 fixed too small: even block3 whole fails, and the result is the upper end, which does not pass
    stuck = calibrate_k(d, [i2, i3], data, tolerance=0.5, batch_size=64, k={"block2": 5})
    assert stuck.k == 128 and stuck.order == [128] and not stuck.passes(128)
    got = literal_correct(target.model, layers, [topk_mask(i2, 5), topk_mask(i3, 128)], data, sigma=0.1,
                          seed=3 ^ CALIBRATION_STREAM)
    assert got == stuck.correct[128] and not within_tolerance(got, base, 160, 0.5)


def test_cli_calibrate_several_layers_then_every_mask_command(cli, tmp_path, imps):
    (p2, _), (p3, _) = imps["block2"], imps["block3"]
    mask = tmp_path / "mask.safetensors"
    common = ["--n-examples", 60, "--batch-size", 32, "--device", "cpu"]
    r = cli("calibrate-k", "--importance", p2, "--importance", p3, "--out", mask, "--plot", tmp_path / "c.png",
            *common, "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["layers"] == ["block2", "block3"] and set(res["k"]) == {"block2", "block3"}
    assert res["k"] == schedule_ks(res["k_search"], res["n_neurons"])
    correct, base = round(res["clean_accuracy"] * 60), round(res["base_clean_accuracy"] * 60)
    assert res["passes"] is within_tolerance(correct, base, 60, res["tolerance"])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    art = load_artifact(mask, kind="mask")
    assert [int(art[name].sum(0)[0]) for name in ("block2", "block3")] == [res["k"]["block2"], res["k"]["block3"]]
    ev = cli("defend-eval", "--mask", mask, *common, "--json")
    assert ev.code == 0, ev.err
    j = ev.json()
    assert j["k"] == res["k"] and j["draws"] == 5
    # defend-eval's figure against the literal defence: final draws = occurrences 0..4 of stream --seed (0)
    sigma = art.meta["defense"]["sigma"]
    data = load_dataset("digits", "test", 60)
    per_draw = literal_per_draw(open_target("demo", None, None, device="cpu").model,
                                ["block2", "block3"], [art["block2"], art["block3"]], data, sigma=sigma, seed=0,
                                draws=5)
    assert j["scores"]["defended"]["clean"]["per_draw"] == per_draw
    assert j["clean_accuracy"] == pytest.approx(sum(per_draw) / (5 * 60))
    # calibrate-k's figure is reproducible: its own stream, scored once
    one = cli("defend-eval", "--mask", mask, *common, "--protocol", "single-draw", "--seed", CALIBRATION_STREAM,
              "--json")
    assert one.code == 0, one.err
    assert one.json()["clean_accuracy"] == res["clean_accuracy"]
    human = cli("calibrate-k", "--importance", p2, "--importance", p3, "--out", mask, *common)
    assert human.code == 0 and "k per layer" in human.out
    fixed = cli("calibrate-k", "--importance", p2, "--importance", p3, "--k", "block2=7", "--k", "block3=9",
                "--out", mask, *common, "--json")
    assert fixed.code == 0, fixed.err
    assert fixed.json()["k"] == {"block2": 7, "block3": 9} and not fixed.json()["searched"]
    ins = cli("inspect", mask, "--json")
    assert [(m["layer"], m["k"], m["n_neurons"]) for m in ins.json()["masks"]] == [("block2", 7, 64),
                                                                                   ("block3", 9, 128)]
    atk = cli("attack", "--mask", mask, "--attack", "fgsm", "--n-examples", 16, "--out", tmp_path / "adv.safetensors",
              "--device", "cpu", "--json")
    assert atk.code == 0, atk.err
    assert atk.json()["target"] == "defended"
    adv = load_artifact(tmp_path / "adv.safetensors", kind="adversarial")
    x16 = load_dataset("digits", "test", 16).all().x
    eps = adv.meta["eps"]
    delta = (adv["x_adv"] - x16[adv["index"]]).abs().amax()
    assert 0 < delta <= eps + 1e-6  # the attack moved the images, within the budget
    ev2 = cli("defend-eval", "--mask", mask, "--attack", "fgsm", "--n-examples", 16, "--workdir", tmp_path / "wd",
              "--device", "cpu", "--json")
    assert ev2.code == 0, ev2.err
    e2 = ev2.json()
    assert set(e2["robust_accuracy"]) == {"fgsm"} and e2["n_examples"] == 16
    assert e2["base_robust_accuracy"]["fgsm"] < e2["base_clean_accuracy"]  # FGSM breaks the base model here
    for extra, msg in ((["--k", "7"], "LAYER=K"), (["--k", "block1=3"], "not one of the masked layers"),
                       (["--k", "block2=65"], "between 1 and N = 64"), (["--k", "block2=x"], "whole number"),
                       (["--layer", "block3"], "--layer")):
        bad = cli("calibrate-k", "--importance", p2, "--importance", p3, "--out", tmp_path / "o.safetensors",
                  *common, *extra)
        lines = bad.err.strip().splitlines()
        assert bad.code == 2 and len(lines) == 1 and msg in lines[0], (extra, bad.err)
    same = cli("calibrate-k", "--importance", p3, "--importance", p3, "--out", tmp_path / "o.safetensors", *common)
    assert same.code == 2 and "listed twice" in same.err


def test_pipeline_several_layers_runs_then_reuses(cli, tmp_path):
    out = tmp_path / "run"
    args = ["pipeline", "--layer", "block2", "--layer", "block3", "--n-probe", 60, "--n-examples", 12,
            "--attack", "aa", "--steps", 2, "--queries", 20, "--batch-size", 64, "--out", out, "--json"]
    r = cli(*args)
    assert r.code == 0, r.err
    res = r.json()
    assert res["layer"] == "block2+block3" and set(res["k"]) == {"block2", "block3"}
    assert res["n_neurons"] == {"block2": 64, "block3": 128} and len(res["paths"]["importance"]) == 2
    art = load_artifact(res["paths"]["mask"], kind="mask")
    assert art.meta["layers"] == ["block2", "block3"] and art.meta["k"] == res["k"]
    again = cli(*args)
    assert again.code == 0, again.err
    assert set(again.json()["stages"].values()) == {"reused"} and again.json()["worst_case"] == res["worst_case"]
    fixed = cli(*args[:-3], "--k", "block2=3", "--out", out, "--json")
    assert fixed.code == 0, fixed.err
    assert fixed.json()["k"]["block2"] == 3 and fixed.json()["stages"]["rank"] == "reused"
