"""igd audit: a model built to mask its gradients is flagged by checks 1, 2 and 6, the undefended demo CNN passes
them, a randomized model gets the randomness flag, the frozen-noise defence is deterministic and differentiable;
figures against literals written here; the CLI's table, JSON, plots and one-line errors. Budgets are tiny."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igd_cli.audit import Audit, run_audit
from igd_cli.audit.defence import mask_change_share
from igd_cli.audit.gradients import loss_surfaces
from igd_cli.common import Target
from igd_cli.defense import IGDefense
from igd_cli.models import LoadedModel
from igd_cli.noise import FixedNoise
from igd_cli.variants import SmoothedModel

EPS = 0.2
#: tiny budgets: APGD 5 steps, 1 restart, Square and RayS 100 queries, 2 EoT samples, 3 surface images on 7×7
TINY = {"steps": 5, "restarts": 1, "queries": 100, "eot_iter": 2, "surface_images": 3, "surface_grid": 7,
        "surface_draws": 2}


class ZeroGrad(nn.Module):
    """The demo CNN behind a layer whose forward is the identity and whose gradient is exactly zero
    (``x + (x.detach() − x)``): predictions unchanged, every gradient attack blind."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + (x.detach() - x))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The audited CNNs are tiny: one thread is many times faster than several contending on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _target(model: nn.Module, name: str, demo) -> Target:
    loaded = LoadedModel(model, name, "test", f"{name}-fp", 10, "digits", EPS)
    return Target(loaded, torch.device("cpu"), "digits")


@pytest.fixture(scope="module")
def data():
    from igd_cli.data import load_dataset

    return load_dataset("digits", "test", 12)


def _audit(target, data, **kw) -> Audit:
    return Audit(target, data, eps=EPS, overrides=TINY, workdir=None, show_progress=False, **kw)


def _verdicts(report) -> dict[int, str]:
    return {c["id"]: c["verdict"] for c in report["checks"]}


def test_masked_gradients_are_flagged_and_the_honest_cnn_passes(demo, data):
    masked = run_audit(_audit(_target(ZeroGrad(demo.model), "zerograd", demo), data), [1, 2, 6])
    honest = run_audit(_audit(_target(demo.model, "demo", demo), data), [1, 2, 6])
    assert _verdicts(masked) == {1: "flag", 2: "flag", 6: "flag"}
    assert _verdicts(honest) == {1: "ok", 2: "ok", 6: "ok"}
    c1 = masked["checks"][0]["figures"]
    assert c1["flags"] == ["zero_gradients"] and c1["zero_gradient_images"] == len(data)
    assert honest["checks"][0]["figures"]["zero_gradient_images"] == 0
    # check 2: black box beats the blind white box on the masked model, not on the honest one
    c2m, c2h = masked["checks"][1]["figures"], honest["checks"][1]["figures"]
    assert min(v["mean"] for v in c2m["blackbox"].values()) < c2m["whitebox"]["mean"]
    assert c2h["whitebox"]["mean"] <= min(v["mean"] for v in c2h["blackbox"].values())
    assert masked["randomized"] is False and masked["draws"] == 1


def test_a_randomized_model_gets_the_randomness_flag(demo, data):
    smooth = SmoothedModel(demo.model, sigma=0.3, seed=1)
    r = run_audit(_audit(_target(demo.model, "demo", demo), data, defense=smooth), [1])
    c1 = r["checks"][0]
    assert c1["verdict"] == "flag" and "randomized" in c1["figures"]["flags"]
    assert any("randomized defense" in m for m in c1["figures"]["messages"]["randomized"])  # pyautoattack's own
    assert c1["figures"]["output_changes_between_calls"] and r["randomized"] and r["draws"] == 5
    assert "randomized" not in run_audit(_audit(_target(demo.model, "demo", demo), data), [1])["checks"][0]["figures"]["flags"]


def test_robust_accuracy_is_the_literal_fgsm_accuracy_on_a_deterministic_model(demo, data):
    a = _audit(_target(demo.model, "demo", demo), data)
    b = data.all()
    x = b.x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(demo.model(x), b.y, reduction="sum"), [x])
    x_adv = (b.x + EPS * g.sign()).clamp(0, 1)
    with torch.no_grad():
        ok = (demo.model(b.x).argmax(1) == b.y) & (demo.model(x_adv).argmax(1) == b.y)
    cell = a.robust(["fgsm"])
    assert cell.score.draws == 1 and cell.std == 0
    assert cell.mean == pytest.approx(float(ok.float().mean()))


def test_loss_surface_against_the_literal_loss(demo, data):
    b = data.get(0, 2)
    s = loss_surfaces(demo.model, b.x, b.y, eps=EPS, grid=5, seed=0)
    with torch.no_grad():
        l0 = F.cross_entropy(demo.model(b.x), b.y, reduction="none")
    assert torch.allclose(s.losses[:, 2, 2], l0, atol=1e-5)  # the grid's centre is x itself
    x = b.x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(demo.model(x), b.y, reduction="sum"), [x])
    with torch.no_grad():  # α = ε, β = 0: the FGSM point
        l_fgsm = F.cross_entropy(demo.model((b.x + EPS * g.sign()).clamp(0, 1)), b.y, reduction="none")
    assert torch.allclose(s.losses[:, 4, 2], l_fgsm, atol=1e-5)
    flat = loss_surfaces(ZeroGrad(demo.model), b.x, b.y, eps=EPS, grid=5, seed=0)
    assert torch.allclose(flat.losses[:, :, 2], l0[:, None].expand(-1, 5), atol=1e-5)  # sign(0): no movement


@pytest.fixture(scope="module")
def defence(demo):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(128, 10, generator=g) < 0.1).to(torch.uint8)
    return IGDefense(demo.model, "block3", mask, sigma=0.1, seed=0)


def test_frozen_noise_defence_is_deterministic_and_differentiable(demo, data, defence):
    a = _audit(_target(demo.model, "demo", demo), data, defense=defence)
    frozen = a.model("frozen")
    b = data.all()
    assert torch.equal(frozen(b.x), frozen(b.x))
    x = b.x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(frozen(x), b.y), [x])
    assert torch.isfinite(g).all() and g.flatten(1).abs().sum(1).gt(0).all()
    # the frozen copy is scored once, the randomized defence by repeated draws
    assert a.robust(["fgsm"], "frozen").score.draws == 1 and a.robust(["fgsm"]).score.draws == 5


def test_mask_change_share_against_the_literal(demo, data, defence):
    """With frozen noise (one known draw) the share is literal: prediction of h(A(x) ⊙ m ŷ) vs argmax ŷ."""
    from igd_cli.variants import frozen_noise

    b = data.all()
    frozen = frozen_noise(defence)
    got = mask_change_share(frozen, b.x, b.y, 2)
    v = 0.1 * FixedNoise(0).sample(b.x, 1)[0]
    with torch.no_grad():
        yhat = F.softmax(demo.model(b.x + v) / 0.01, dim=1)
        s = yhat @ defence.mask.t()
        h = demo.model.block3.register_forward_hook(lambda _m, _i, out: out * s[:, :, None, None])
        try:
            pred = demo.model(b.x).argmax(1)
        finally:
            h.remove()
    assert torch.equal(got[0], pred != yhat.argmax(1)) and torch.equal(got[0], got[1])


# --- the command ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mask_file(tmp_path_factory):
    from igd_cli.cli import main

    d = tmp_path_factory.mktemp("audit")
    assert main(["rank", "--method", "random", "--out", str(d / "imp.safetensors")]) == 0
    assert main(["calibrate-k", "--importance", str(d / "imp.safetensors"), "--k", "8", "--n-examples", "20",
                 "--out", str(d / "mask.safetensors")]) == 0
    return d / "mask.safetensors"


def test_cli_json_table_and_plots(cli, mask_file, tmp_path, igd_home):
    r = cli("audit", "--mask", mask_file, "--n-examples", "6", "--checks", "9,1", "--json",
            "--plot-dir", tmp_path / "plots", "--workdir", tmp_path / "adv")
    assert r.code == 0, r.err
    j = r.json()
    assert [c["id"] for c in j["checks"]] == [1, 9] and j["randomized"] and j["draws"] == 5
    assert j["checks"][0]["verdict"] == "flag" and "randomized" in j["checks"][0]["figures"]["flags"]
    assert set(j["checks"][1]["figures"]) == {"clean", "apgd-eot"} and j["thresholds"]["mask_acts_share"] > 0
    assert list((tmp_path / "adv").glob("defended-apgd-eot-*.safetensors"))  # the set is kept for reuse
    r2 = cli("audit", "--n-examples", "4", "--checks", "6,7", "--plot-dir", tmp_path / "plots")
    assert r2.code == 0, r2.err
    assert "loss surface" in r2.out and "n/a" in r2.out and (tmp_path / "plots" / "surface.png").stat().st_size > 0


@pytest.mark.parametrize("args, needle", [
    (["--checks", "1,11"], "no check 11"), (["--checks", "one"], "expected check numbers"),
    (["--preset", "huge"], "--preset huge"), (["--n-examples", "0"], "--n-examples 0"),
    (["--eps", "2"], "--eps 2"), (["--mask", "missing.safetensors"], "missing.safetensors")])
def test_cli_bad_input_is_one_error_line(cli, args, needle, igd_home):
    r = cli("audit", *args)
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


def test_iwwc_equals_defend_eval_without_skipping(demo, data, defence):
    """Check 10's IW-WC (the audit's own candidate order) is igd defend-eval's worst case, draw for draw."""
    from igd_cli.evaluate import Budgets, evaluate_defense

    tiny = {"steps": 3, "queries": 40, "eot_iter": 2, "restarts": 1}
    target = _target(demo.model, "demo", demo)
    few = data.view(0, 4)
    a = Audit(target, few, eps=EPS, overrides=tiny, workdir=None, show_progress=False, defense=defence)
    ref = evaluate_defense(target, defence, few, attack="iw-wc", workdir=None, budgets=Budgets(**tiny), eps=EPS,
                           skip=False, show_progress=False).to_json()
    assert a.iwwc().score.to_json() == ref["iw_wc_paper_score"]  # the paper's nine (defend-eval adds the adaptive)
    for col, score in ref["scores"]["defended"].items():  # every column: the same sets, scored the same way
        if col.startswith("tr-"):
            assert a.robust([col[3:]], "base", on="audited").score.to_json() == score, col
        elif col in ("aa", "rays", "apgd-eot"):
            assert a.robust([col]).score.to_json() == score, col
    assert a.robust(["apgd-ce", "apgd-cw", "apgd-t-dlr", "aa", "rays", "apgd-eot"], "base").mean == ref["base_worst_case"]
