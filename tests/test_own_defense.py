"""A user's own test-time defence through igd (``--defense FILE.py:NAME``, igd_cli/contract.py): the example
defences of examples/defenses/ on the demo model against independent reference attacks written here (BPDA-PGD
with the identity as the transform's backward; PGD with EoT for the randomized ones), the audit flagging the
gradient masking, a defence without any gradient attacked without crashing, the draws of a randomized user
defence keyed by image and query, identities by source content, shards and merge, and the CLI's errors.

Everything on the first 16 digits test images at ε = 0.2 with tiny budgets (a few seconds per test).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from igd_cli import contract, noise
from igd_cli.artifacts import load_artifact
from igd_cli.audit import run_audit
from igd_cli.errors import IgdError
from igd_cli.evaluate import Budgets, evaluate_defense

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "defenses"
EPS = 0.2
N = 16
TINY = Budgets(steps=10, restarts=1, queries=100, eot_iter=4)


def spec(name: str) -> str:
    return f"{EXAMPLES / name}.py:{name}"


@pytest.fixture(scope="module")
def target():
    from igd_cli.common import open_target

    return open_target("demo", None, None, "Linf", "cpu", None)


@pytest.fixture(scope="module")
def data(target):
    return target.data("test", N, None)


# --- independent references -----------------------------------------------------------------------------

def pgd(forward, x: torch.Tensor, y: torch.Tensor, *, steps: int, eot: int = 1) -> torch.Tensor:
    """ℓ∞ PGD from the clean image, sign steps of ε/4, cross-entropy summed over ``eot`` forwards per step."""
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = sum(F.cross_entropy(forward(xa), y, reduction="sum") for _ in range(eot))
        (g,) = torch.autograd.grad(loss, xa)
        xa = (x + (xa.detach() + EPS / 4 * g.sign() - x).clamp(-EPS, EPS)).clamp(0, 1)
    return xa.detach()


def bpda_reference(base: nn.Module, transform, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Athalye et al.'s BPDA: the transform's forward, the identity as its backward, PGD on the base model;
    per image whether the defence (transform, then base) still classifies the point correctly."""
    xa = pgd(lambda z: base(z + (transform(z) - z).detach()), x, y, steps=20)
    with torch.no_grad():
        return base(transform(xa)).argmax(1) == y


# --- the deterministic examples: gradient masking, BPDA -----------------------------------------------------

@pytest.mark.parametrize("name", ["bit_depth", "jpeg"])
def test_igd_worst_case_reaches_bpda_on_every_image(target, data, name):
    """Every image the BPDA reference breaks, igd's IW-WC (nine columns + adaptive) breaks too; the gradient
    attacks on the defence itself are blind (bit depth: zero gradient, they do no better than the clean images
    the reference breaks; JPEG-like: no gradient at all, they report it and leave no column)."""
    d = contract.build_defense(spec(name), target.model)
    b = data.all()
    transform = d.defense.squeeze if name == "bit_depth" else d.defense.compress
    ref = bpda_reference(target.model, transform, b.x, b.y)
    res = evaluate_defense(target, d, data, attack="iw-wc", workdir=None, budgets=TINY, show_progress=False,
                           skip=False)
    worst = res.worst()[0]
    assert not (worst & ~ref).any(), "an image the BPDA reference breaks survives igd's worst case"
    assert worst.float().mean() <= ref.float().mean()
    j = res.to_json()
    assert j["robust_accuracy"]["adaptive"] <= ref.float().mean().item()  # the BPDA column alone reaches it
    if name == "jpeg":
        assert j["no_gradient"] == ["aa", "apgd-eot"] and "aa" not in j["robust_accuracy"]
    else:
        # zero gradients: the direct white-box attack stays at the clean accuracy, far above BPDA
        assert j["robust_accuracy"]["apgd-eot"] == j["clean_accuracy"] > ref.float().mean().item() + 0.1


@pytest.mark.parametrize("name,flags", [("bit_depth", {1: "flag", 6: "flag"}),
                                        ("jpeg", {1: "flag", 2: "flag", 3: "n/a", 6: "flag"})])
def test_audit_flags_the_masking(target, data, name, flags):
    """AutoAttack's zero-gradient flag (1) and the loss surface (6) flag both; with no gradient at all, black box
    vs white box (2) flags and the checks that need a gradient attack are n/a."""
    from tests.test_audit import TINY as AUDIT_TINY, _audit

    d = contract.build_defense(spec(name), target.model)
    r = run_audit(_audit(target, data, defense=d), sorted(flags))
    assert {c["id"]: c["verdict"] for c in r["checks"]} == flags
    assert r["defense_spec"] == spec(name)
    assert AUDIT_TINY["steps"] == 5  # the audit's own tiny budgets


# --- the randomized examples: EoT ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["random_resize", "smoothing"])
def test_igd_worst_case_reaches_eot_pgd(target, data, name):
    """PGD with EoT (the gradient summed over 4 forwards, 10 steps, as igd's budget here), scored by the mean
    over 16 draws at its points: igd's adaptive column (APGD + EoT stages and PGD + EoT) is at most that plus 5
    points (APGD + EoT alone falls short at this budget, docs/own-defense.md). The worst case selects
    per image among 11 candidates on 20 noisy draws and is scored on 20 fresh ones, so it sits a little above
    its best column near the boundary (the selection's optimism removed): at most the reference plus 8 points."""
    d = contract.build_defense(spec(name), target.model)
    assert contract.randomized(d)
    b = data.all()
    inner = d.defense  # outside igd's evaluation its draws come from torch's generator
    torch.manual_seed(0)
    xa = pgd(inner, b.x, b.y, steps=10, eot=4)
    with torch.no_grad():
        ref = torch.stack([inner(xa).argmax(1) == b.y for _ in range(16)]).float().mean()
    res = evaluate_defense(target, d, data, attack="iw-wc", workdir=None, budgets=TINY, show_progress=False,
                           draws=20)
    j = res.to_json()
    assert j["randomized"] and j["draws"] == 20 and j["no_gradient"] == []
    assert j["robust_accuracy"]["adaptive"] <= ref.item() + 0.05
    assert j["worst_case"] <= ref.item() + 0.08


def test_adaptive_column_reaches_pgd_eot_on_the_smoothing_example(target):
    """The adaptive attack alone on 32 images at igd's budget here, scored by 16 draws: within 2 points of the
    PGD + EoT reference at the same budget (its APGD + EoT stages alone stay 3 points above it)."""
    from igd_cli.attacks import make_attack, run_attack
    from igd_cli.scoring import score_set

    data = target.data("test", 32, None)
    b = data.all()
    d = contract.build_defense(spec("smoothing"), target.model)
    torch.manual_seed(0)
    xa = pgd(d.defense, b.x, b.y, steps=10, eot=4)
    with torch.no_grad():
        ref = torch.stack([d.defense(xa).argmax(1) == b.y for _ in range(16)]).float().mean().item()
    atk = make_attack("adaptive", d, eps=EPS, seed=0, num_classes=10, strict=False, steps=10, eot_iter=4, restarts=1)
    res = run_attack(atk, data, show_progress=False)
    _, robust = score_set(d, b.x, res.x_adv, res.y, res.index, protocol="draws", draws=16, seed=0)
    assert robust.mean <= ref + 0.02


# --- a defence without any gradient and without a surrogate -----------------------------------------------

class NoGrad(nn.Module):
    """The demo's predictions through a transform computed without autograd, and no surrogate."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = torch.round(x * 15) / 15
        return self.model(z)


def no_grad(base: nn.Module) -> nn.Module:
    return NoGrad(base)


def test_no_gradient_and_no_surrogate_rests_on_the_other_columns(target, data):
    """Every gradient column (AA, APGD+EoT, the adaptive attack) reports no gradient instead of crashing; the
    worst case is the image-wise worst case of clean, RayS and the six transferred sets, computed here."""
    from igd_cli.scoring import final_of_selected

    d = contract.build_defense(f"{__name__}:no_grad", target.model)
    res = evaluate_defense(target, d, data, attack="iw-wc", workdir=None, budgets=TINY, show_progress=False,
                           skip=False)
    assert sorted(res.no_gradient) == ["aa", "adaptive", "apgd-eot"]
    assert sorted(res.defended) == sorted(["rays", "tr-apgd-ce", "tr-apgd-cw", "tr-apgd-t-dlr", "tr-aa", "tr-rays",
                                           "tr-apgd-eot"])
    want = final_of_selected([res.clean_defended, *(res.defended[k] for k in res.defended)])
    assert torch.equal(res.worst(), want)


def test_cli_gradient_attack_on_a_defence_without_gradient_is_one_error_line(cli, tmp_path, igd_home):
    r = cli("attack", "--model", "demo", "--defense", f"{__name__}:no_grad", "--attack", "apgd-ce", "--steps", 2,
            "--n-examples", 4, "--out", tmp_path / "a.safetensors")
    assert r.code == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1
    assert "no gradient" in r.err or "has none" in r.err


# --- draws of a randomized user defence -------------------------------------------------------------------

class TorchNoise(nn.Module):
    """Randomized with torch's default generator (no igd_cli.noise)."""

    randomized = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + 0.3 * torch.randn_like(x))


def torch_noise(base: nn.Module) -> nn.Module:
    return TorchNoise(base)


def _queries(d: nn.Module, x: torch.Tensor, keys: torch.Tensor, n: int = 2) -> list[torch.Tensor]:
    with torch.no_grad(), noise.images(keys, noise.stream(0, "test")):
        return [d(x) for _ in range(n)]


def test_draws_are_keyed_by_image_and_query(target, data):
    """igd_cli.noise draws (the smoothing example): an image's output is the same alone or in any batch, fresh
    at its next query. torch's generator: seeded per query from the images and their ordinals, so the same
    queries give the same outputs and the next query fresh ones (whatever torch's global state)."""
    b = data.all()
    keys = noise.image_keys(b.index, b.x)
    sm = contract.build_defense(spec("smoothing"), target.model)
    whole = _queries(sm, b.x, keys)
    part = _queries(sm, b.x[3:7], keys[3:7])
    assert torch.equal(whole[0][3:7], part[0]) and torch.equal(whole[1][3:7], part[1])
    assert not torch.equal(whole[0], whole[1])
    tn = contract.build_defense(f"{__name__}:torch_noise", target.model)
    torch.manual_seed(123)
    first = _queries(tn, b.x, keys)
    torch.manual_seed(456)
    again = _queries(tn, b.x, keys)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])


def test_a_randomized_user_defence_outside_an_image_block_is_refused(target, data, monkeypatch):
    monkeypatch.setattr(noise, "STRICT", True)
    d = contract.build_defense(f"{__name__}:torch_noise", target.model)
    with pytest.raises(noise.UndeclaredQuery):
        d(data.all().x)


# --- identity --------------------------------------------------------------------------------------------

def test_identity_is_the_source_not_the_path(target, tmp_path):
    """A copied file is the same defence (same source sha256 and fingerprint); an edited one is another."""
    a = contract.identity(contract.build_defense(spec("bit_depth"), target.model))
    shutil.copy(EXAMPLES / "bit_depth.py", tmp_path / "copy.py")
    b = contract.identity(contract.build_defense(f"{tmp_path / 'copy.py'}:bit_depth", target.model))
    assert a["source_sha256"] == b["source_sha256"] and a["defense_fingerprint"] == b["defense_fingerprint"]
    (tmp_path / "edited.py").write_text((EXAMPLES / "bit_depth.py").read_text().replace("bits: int = 3",
                                                                                       "bits: int = 2"))
    c = contract.identity(contract.build_defense(f"{tmp_path / 'edited.py'}:bit_depth", target.model))
    assert c["source_sha256"] != a["source_sha256"] and c["settings"] == {"bits": 2}


def test_two_defences_in_one_workdir_keep_their_own_sets(target, tmp_path):
    """evaluate_defense without defense_meta in one workdir: a second defence's sets are its own (before, the
    first defence's were reused as the second's: its figures were those of the first defence's points)."""
    data = target.data("test", 8, None)
    budgets = Budgets(queries=40)
    shared = tmp_path / "adv"
    evaluate_defense(target, contract.build_defense(spec("bit_depth"), target.model), data, attack="rays",
                     workdir=shared, budgets=budgets, show_progress=False)
    sm = contract.build_defense(spec("smoothing"), target.model)
    a = evaluate_defense(target, sm, data, attack="rays", workdir=shared, budgets=budgets, show_progress=False)
    b = evaluate_defense(target, sm, data, attack="rays", workdir=None, budgets=budgets, show_progress=False)
    assert torch.equal(a.defended["rays"], b.defended["rays"])
    assert len(list(shared.rglob("*.safetensors"))) == 3  # the base set, and one set per defence


# --- the CLI ---------------------------------------------------------------------------------------------

def test_cli_shards_merge_to_the_whole_run(cli, tmp_path, igd_home):
    """defend-eval --defense --attack iw-wc in two shards, merged: the whole run's worst case and columns."""
    common = ["defend-eval", "--model", "demo", "--defense", spec("jpeg"), "--attack", "iw-wc", "--n-examples", 8,
              "--steps", 3, "--queries", 30, "--workdir", tmp_path / "adv"]
    whole = cli(*common, "--report", tmp_path / "whole.safetensors", "--json")
    assert whole.code == 0, whole.err
    w = whole.json()
    assert w["defense_spec"] == spec("jpeg") and w["no_gradient"] == ["aa", "apgd-eot"] and w["mask"] is None
    parts = []
    for i in range(2):
        p = tmp_path / f"part{i}.safetensors"
        r = cli(*common, "--shard", f"{i}/2", "--report", p)
        assert r.code == 0, r.err
        parts.append(p)
    m = cli("merge", *parts, "--out", tmp_path / "merged.safetensors", "--json")
    assert m.code == 0, m.err
    a = load_artifact(tmp_path / "whole.safetensors", kind="eval-report")
    b = load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    assert sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k]), k
    assert m.json()["worst_case"] == w["worst_case"]


def not_a_module(base: nn.Module) -> str:
    return "defended"


@pytest.mark.parametrize("args,needle", [
    (["--defense", "nosuchfile.py:f"], "no such file"),
    (["--defense", f"{EXAMPLES / 'jpeg.py'}:nothing"], "has no attribute"),
    (["--defense", "tests.test_own_defense:not_a_module"], "not a torch.nn.Module"),
    (["--defense", f"{EXAMPLES / 'jpeg.py'}:jpeg", "--mask", "m.safetensors"], "give one of them"),
    (["--defense", f"{EXAMPLES / 'jpeg.py'}:jpeg", "--sigma", "0.1"], "IG-Defense's settings"),
    ([], "give --mask FILE"),
])
def test_cli_bad_defense_is_one_error_line(cli, args, needle, igd_home):
    r = cli("defend-eval", "--model", "demo", "--n-examples", 4, *args)
    assert r.code == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
    assert needle in r.err


def test_evaluation_reaches_ig_defense_only_through_the_contract():
    """The attacks, the evaluation and the audit use no IG-Defense attribute or class in their code (docstrings
    aside): IG-Defense is one implementation of the contract, reached through igd_cli.contract."""
    import ast

    ig_only = {"IGDefense", "bpda", "sample_noise", "masked_tail", "features", "n_smooth", "masks", "_noise",
               "frozen_noise", "SmoothedModel", "load_defense"}
    pkg = ROOT / "igd_cli"
    files = [pkg / "evaluate.py", pkg / "scoring.py", *sorted((pkg / "attacks").glob("*.py")),
             *sorted((pkg / "audit").glob("*.py"))]
    for f in files:
        used = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.alias):
                used.add(node.name.rpartition(".")[2])
        assert not used & ig_only, f"{f.name} uses {sorted(used & ig_only)}"


def test_batch_size_trial_runs_on_a_defence_without_gradient(target, data):
    """``--batch-size auto``'s attack trial on a --defense: the gradient attacks the evaluation leaves out are left
    out of the trial too, and the adaptive attack is tried on the defended model."""
    from igd_cli.batching import attack_trial

    d = contract.build_defense(f"{__name__}:no_grad", target.model)
    attack_trial([d, target.model], data, "iw-wc", eps=EPS, num_classes=10)(4)
