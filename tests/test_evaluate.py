"""IW-WC evaluation: worst case is the per-image minimum, skipping keeps it, resume gives the same table,
ready-made sets (and shards) are reused, the defended target works through ``--mask``."""

from __future__ import annotations

import json

import pytest
import torch

import igd_cli.attacks as attacks_mod
import igd_cli.evaluate as ev
from igd_cli.artifacts import load_artifact, save_artifact
from igd_cli.attacks import predict
from igd_cli.attacks.apgd import APGDEoT
from igd_cli.common import open_target
from igd_cli.data import load_dataset
from igd_cli.errors import IgdError
from igd_cli.evaluate import Budgets, evaluate_defense
from igd_cli.scoring import final_rows, selected

N = 14
TINY = Budgets(steps=3, restarts=1, queries=25, eot_iter=2)


@pytest.fixture(scope="module")
def target():
    return open_target("demo", None, None, "Linf", "cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "test", N)


def _mask_file(path, target, k=40, rs=True):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(128, 10, dtype=torch.uint8)
    for c in range(10):
        mask[torch.randperm(128, generator=g)[:k], c] = 1
    meta = {**target.provenance(), "layer": "block3", "k": k, "importance_file": "none", "importance_sha256": "0",
            "method": "random", "defense": {"tau": 0.01, "sigma": 0.1, "n_smooth": 1, "rs": rs, "eps": 0.2}}
    return save_artifact(path, "mask", {"mask": mask}, meta)


@pytest.fixture(scope="module")
def mask_path(tmp_path_factory, target):
    return _mask_file(tmp_path_factory.mktemp("mask") / "mask.safetensors", target)


def _defense(target, mask_path, rs=None):
    from igd_cli.defense import load_defense

    return load_defense(target, mask_path, rs=rs, seed=0)


def _strip(j):
    j = dict(j)
    j.pop("seconds"), j.pop("sets")
    return j


@pytest.fixture(scope="module")
def iwwc(tmp_path_factory, target, data, mask_path):
    d = _defense(target, mask_path)
    work = tmp_path_factory.mktemp("work")
    res = evaluate_defense(target, d, data, attack="iw-wc", workdir=work, budgets=TINY, seed=0, batch_size=8,
                           defense_meta=ev.defense_identity(mask_path, d), show_progress=False)
    return res, work


def _protocol_reference(cands, r):
    """The repeated-draw protocol written out image by image (independent of igd_cli.scoring): rows 0..R-1 of a
    candidate are its final draws, rows R..2R-1 its selection draws; per image the first candidate with the fewest
    correct selection draws is selected and its final draws score the image."""
    n = cands[0].shape[1]
    per_draw, majority, every = [0] * r, 0, 0
    for i in range(n):
        sel = [int(c[r:, i].sum()) for c in cands]
        best = sel.index(min(sel))
        final = [bool(cands[best][d, i]) for d in range(r)]
        for d in range(r):
            per_draw[d] += final[d]
        majority += sum(final) > r / 2
        every += all(final)
    accs = [c / n for c in per_draw]
    mean = sum(accs) / r
    std = (sum((a - mean) ** 2 for a in accs) / (r - 1)) ** 0.5
    return mean, std, majority / n, every / n


def test_worst_case_follows_the_protocol(iwwc):
    res, _ = iwwc
    j = res.to_json()
    assert set(j["robust_accuracy"]) == {"aa", "rays", "apgd-eot", "tr-apgd-ce", "tr-apgd-cw", "tr-apgd-t-dlr",
                                         "tr-aa", "tr-rays", "tr-apgd-eot", "adaptive"}  # + the tenth (issue 22)
    assert j["draws"] == 5 and j["randomized"] and j["protocol"] == "draws"
    cands = [res.clean_defended, *res.defended.values()]
    assert all(c.shape == (10, N) for c in cands)
    mean, std, majority, every = _protocol_reference(cands, 5)
    assert j["worst_case"] == pytest.approx(mean, abs=1e-12) and j["worst_case_std"] == pytest.approx(std, abs=1e-12)
    assert j["worst_case_majority"] == pytest.approx(majority) and j["worst_case_all_draws"] == pytest.approx(every)
    assert every <= mean + 1e-9 and j["worst_case"] <= j["clean_accuracy"] + 1e-9
    for k, bits in res.defended.items():  # each column: the protocol over {clean, its point}
        m, s, _, _ = _protocol_reference([res.clean_defended, bits], 5)
        assert j["robust_accuracy"][k] == pytest.approx(m, abs=1e-12), k
        assert j["robust_accuracy_std"][k] == pytest.approx(s, abs=1e-12), k
    # the base model is deterministic: scored once, the worst case is the AND over its candidates
    base_rows = torch.cat([res.clean_base] + [res.base[f"tr-{a}"] for a in ev.TRANSFER])
    assert res.clean_base.shape == (1, N)
    assert j["base_worst_case"] == int(base_rows.all(0).sum()) / N
    # Table 8's base row: the direct columns are the base model's own attacks
    for a in ev.DIRECT:
        assert j["base_robust_accuracy"][a] == j["base_robust_accuracy"][f"tr-{a}"]
    pc = j["per_class"]["rows"]["defended:worst_case"]
    present = [a for a in pc["accuracy"] if a is not None]
    assert pc["worst"] == min(present) and pc["best"] == max(present)
    assert json.loads(json.dumps(j)) == j


def test_sets_on_disk_are_valid_artifacts(iwwc, target, data):
    res, work = iwwc
    files = sorted(work.glob("*.safetensors"))
    assert len(files) == 10  # the nine and the adaptive attack (beyond the paper)
    x = data.all().x
    for f in files:
        art = load_artifact(f, kind="adversarial", fingerprint=target.loaded.fingerprint)
        m = art.meta
        assert m["target"] in ("base", "defended") and m["attack"] in attacks_mod.ATTACKS
        assert (art["x_adv"] - x[art["index"]]).abs().amax() <= 0.2 + 1e-6
        if m["target"] == "defended":
            assert m["mask_sha256"] == m["defense"]["mask_sha256"] and len(m["mask_sha256"]) == 64


def test_resume_after_interruption_gives_the_same_table(iwwc, tmp_path, target, data, mask_path, monkeypatch):
    full, _ = iwwc

    class Boom(APGDEoT):
        def perturb(self, x, y, index):
            if self.randomized:
                raise RuntimeError("interrupted")
            return super().perturb(x, y, index)

    d = _defense(target, mask_path)
    ident = ev.defense_identity(mask_path, d)
    monkeypatch.setitem(attacks_mod.ATTACKS, "apgd-eot", Boom)
    with pytest.raises(RuntimeError):
        evaluate_defense(target, d, data, attack="iw-wc", workdir=tmp_path, budgets=TINY, seed=0, batch_size=8,
                         defense_meta=ident, show_progress=False)
    monkeypatch.setitem(attacks_mod.ATTACKS, "apgd-eot", APGDEoT)
    assert len(list(tmp_path.glob("*.safetensors"))) == 7  # six base sets and the defended AA
    ran = []
    again = evaluate_defense(target, _defense(target, mask_path), data, attack="iw-wc", workdir=tmp_path,
                             budgets=TINY, seed=0, batch_size=8, defense_meta=ident, show_progress=False,
                             on_set=lambda a, k, r: ran.append((k, a)))
    assert sorted(ran) == [("defended", "adaptive"), ("defended", "apgd-eot"), ("defended", "rays")]
    assert _strip(again.to_json()) == _strip(full.to_json())
    # and a third run computes nothing
    ran.clear()
    evaluate_defense(target, _defense(target, mask_path), data, attack="iw-wc", workdir=tmp_path, budgets=TINY,
                     seed=0, batch_size=8, defense_meta=ident, show_progress=False,
                     on_set=lambda a, k, r: ran.append((k, a)))
    assert ran == []


@pytest.mark.parametrize("rs", [False, True])
def test_skipping_keeps_the_worst_case(tmp_path, target, data, mask_path, monkeypatch, rs):
    """Per-image seeded attacks (AutoAttack and its Square included: the real direct attacks), on a deterministic
    defence and on the randomized one (its noise is keyed by image content, so survivors attacked in other batches
    see the same noise): same worst case, and the survivor columns are marked and never above the full ones."""
    monkeypatch.setattr(ev, "TRANSFER", ("apgd-ce", "pgd"))  # fewer transfer sets: leave the direct ones work
    d = _defense(target, mask_path, rs=rs)
    if rs:  # noise strong enough to flip predictions, so that other noise for a survivor would show
        from igd_cli.defense import load_defense

        d = load_defense(target, mask_path, rs=True, sigma=0.35, tau=0.3, seed=0)
    assert d.randomized == rs
    ident = ev.defense_identity(mask_path, d)
    kw = dict(attack="iw-wc", budgets=Budgets(steps=3, queries=60, eot_iter=2), seed=0, batch_size=5,
              defense_meta=ident, show_progress=False)
    fast = evaluate_defense(target, d, data, workdir=tmp_path / "a", skip=True, **kw)
    slow = evaluate_defense(target, d, data, workdir=tmp_path / "b", skip=False, **kw)
    assert torch.equal(fast.worst(True), slow.worst(True))  # the final draws of the selected points
    assert torch.equal(selected(fast.candidates(True)), selected(slow.candidates(True)))
    assert 0 < int(fast.worst(True).sum()) < int(final_rows(fast.clean_defended).sum())
    for k in ("worst_case", "worst_case_std", "worst_case_majority", "worst_case_all_draws"):
        assert fast.to_json()[k] == slow.to_json()[k], k
    assert set(fast.survivors_only) <= {"aa", "rays", "apgd-eot", "adaptive"} and fast.survivors_only
    assert not slow.survivors_only
    fj, sj = fast.to_json(), slow.to_json()
    for k in fj["robust_accuracy"]:
        assert fj["robust_accuracy"][k] <= sj["robust_accuracy"][k] + 1e-9
        if k not in fast.survivors_only:
            assert fj["robust_accuracy"][k] == sj["robust_accuracy"][k]


def test_given_sets_and_shards_are_reused(tmp_path, cli, target, data, mask_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"ce{i}.safetensors"
        r = cli("attack", "--attack", "apgd-ce", "--steps", "3", "--n-examples", N, "--shard", f"{i}/2",
                "--device", "cpu", "--out", p, "--json")
        assert r.code == 0, r.err
        paths.append(p)
    d = _defense(target, mask_path)
    ident = ev.defense_identity(mask_path, d)
    ran = []
    res = evaluate_defense(target, d, data, attack="none", adv_files=paths, workdir=None, seed=0,
                           defense_meta=ident, show_progress=False, on_set=lambda a, k, r: ran.append(a))
    assert ran == [] and set(res.defended) == {"tr-apgd-ce"}
    whole = tmp_path / "ce.safetensors"
    assert cli("attack", "--attack", "apgd-ce", "--steps", "3", "--n-examples", N, "--device", "cpu",
               "--out", whole).code == 0
    one = evaluate_defense(target, _defense(target, mask_path), data, attack="none", adv_files=[whole],
                           workdir=None, seed=0, defense_meta=ident, show_progress=False)
    assert _strip(one.to_json())["robust_accuracy"] == _strip(res.to_json())["robust_accuracy"]
    art = load_artifact(whole, kind="adversarial")
    x_clean = data.all().x
    base_acc = float((predict(target.model, art["x_adv"]) == data.all().y)
                     .logical_and(predict(target.model, x_clean) == data.all().y).float().mean())
    assert one.to_json()["base_robust_accuracy"]["tr-apgd-ce"] == pytest.approx(base_acc)
    # reruns of a randomized defence agree (fixed seed)
    again = evaluate_defense(target, _defense(target, mask_path), data, attack="none", adv_files=[whole],
                             workdir=None, seed=0, defense_meta=ident, show_progress=False)
    assert _strip(again.to_json()) == _strip(one.to_json())


def test_bad_sets_are_refused(tmp_path, target, data):
    x = data.all()
    far = (x.x + 0.5).clamp(0, 1)
    p = save_artifact(tmp_path / "far.st", "adversarial", {"x_adv": far, "y": x.y, "index": x.index},
                      {**target.provenance(), "attack": "pgd", "target": "base", "eps": 0.2,
                       "data": {"dataset": "digits", "split": "test", "n": N}})
    with pytest.raises(IgdError, match="ε-ball"):
        evaluate_defense(target, None, data, adv_files=[p], workdir=None, show_progress=False)
    q = save_artifact(tmp_path / "other.st", "adversarial", {"x_adv": x.x, "y": x.y, "index": x.index},
                      {**target.provenance(), "model_fingerprint": "0" * 16, "attack": "pgd", "target": "base",
                       "eps": 0.2, "data": {"dataset": "digits", "split": "test", "n": N}})
    with pytest.raises(IgdError, match="not on this base model"):
        evaluate_defense(target, None, data, adv_files=[q], workdir=None, show_progress=False)
    with pytest.raises(IgdError, match="unknown"):
        evaluate_defense(target, None, data, attack="nope", workdir=None, show_progress=False)


def test_cli_attack_on_the_defended_model(cli, tmp_path, mask_path, target):
    out = tmp_path / "def.safetensors"
    r = cli("attack", "--attack", "apgd-eot", "--steps", "2", "--eot-iter", "2", "--n-examples", "6",
            "--mask", mask_path, "--device", "cpu", "--out", out, "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert j["target"] == "defended"
    art = load_artifact(out, kind="adversarial", fingerprint=target.loaded.fingerprint)
    assert art.meta["target"] == "defended" and art.meta["mask_sha256"]
    assert art.meta["budget"] == {"steps": 2, "restarts": 1, "eot_iter": 2}
    r2 = cli("attack", "--attack", "apgd-eot", "--steps", "2", "--eot-iter", "2", "--n-examples", "6",
             "--mask", mask_path, "--device", "cpu", "--out", tmp_path / "def2.safetensors", "--json")
    assert r2.json()["robust_accuracy"] == j["robust_accuracy"]  # fixed seed: reruns agree
    assert torch.equal(load_artifact(tmp_path / "def2.safetensors")["x_adv"], art["x_adv"])


def test_defend_eval_uses_the_library(cli, tmp_path, mask_path):
    adv = tmp_path / "pgd.safetensors"
    r = cli("attack", "--attack", "pgd", "--steps", "3", "--n-examples", "8", "--device", "cpu", "--out", adv)
    assert r.code == 0 and "budget steps 3" in " ".join(r.out.split()) and "{" not in r.out  # no dict repr
    r = cli("defend-eval", "--mask", mask_path, "--adv", adv, "--n-examples", "8", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert set(j) >= {"n_examples", "clean_accuracy", "base_clean_accuracy", "robust_accuracy",
                      "base_robust_accuracy", "worst_case"}
    assert set(j["robust_accuracy"]) == {"tr-pgd"} and j["worst_case"] == j["robust_accuracy"]["tr-pgd"]
    # a set holding fewer images than evaluated is refused (its missing images would read as broken)
    r = cli("defend-eval", "--mask", mask_path, "--adv", adv, "--n-examples", "12", "--device", "cpu")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert r.err.strip() == (f"error: {adv}: holds 8 of the 12 images evaluated (4 missing, which would count as "
                             f"broken): pass --n-examples 8")
    r = cli("defend-eval", "--mask", mask_path, "--adv", adv, "--n-examples", "8", "--device", "cpu")
    assert r.code == 0 and "defend-eval --adv:" in r.out


def test_table_rendering(iwwc):
    from rich.console import Console

    res, _ = iwwc
    con = Console(record=True, width=100)
    ev.render_table(res, con)
    ev.render_per_class(res, con)
    text = con.export_text()
    for label in ("Clean", "AA", "RayS", "APGD+EoT", "Tr-APGD-CE", "Tr-APGD-CW", "Tr-APGD-tgt-DLR", "Tr-AA",
                  "Tr-RayS", "Tr-APGD+EoT", "IW-WC", "+ IG-Defense", "defended:worst_case"):
        assert label in text, label
    assert f"{100 * res.to_json()['worst_case']:.2f}" in text


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, target, data):
    """PGD and FGSM sets made on the base model (transfer sets for the scoring tests)."""
    from igd_cli.attacks import make_attack, run_attack

    out = []
    for name in ("pgd", "fgsm"):
        atk = make_attack(name, target.model, eps=0.2, seed=0, steps=3 if name == "pgd" else None)
        res = run_attack(atk, data, batch_size=8, show_progress=False)
        p = tmp_path_factory.mktemp("sets") / f"{name}.safetensors"
        ev.save_adversarial(p, res, ev.set_meta(target.provenance(), atk.describe(), "base", data, 0.0))
        out.append(p)
    return out


def test_a_deterministic_defence_equals_the_single_draw_protocol(target, data, mask_path, two_sets):
    d = _defense(target, mask_path, rs=False)
    kw = dict(attack="none", adv_files=two_sets, workdir=None, seed=0, show_progress=False,
              defense_meta=ev.defense_identity(mask_path, d))
    many = evaluate_defense(target, d, data, **kw).to_json()
    one = evaluate_defense(target, _defense(target, mask_path, rs=False), data, protocol="single-draw", **kw).to_json()
    assert many["draws"] == 1 and not many["randomized"]
    assert many["worst_case"] == many["worst_case_majority"] == many["worst_case_all_draws"] == one["worst_case"]
    assert many["worst_case_std"] == 0 and set(many["robust_accuracy_std"].values()) == {0.0}
    assert many["robust_accuracy"] == one["robust_accuracy"] and many["clean_accuracy"] == one["clean_accuracy"]
    assert 0 < many["worst_case"] < many["clean_accuracy"]


def test_a_mask_keeping_every_neuron_is_the_base_model(tmp_path, target, data, two_sets):
    """k = N: s = Σ_c ŷ_c = 1 whatever the noise, so the randomized defence is the base model in every draw."""
    path = _mask_file(tmp_path / "all.safetensors", target, k=128)
    d = _defense(target, path)
    assert d.randomized
    res = evaluate_defense(target, d, data, attack="none", adv_files=two_sets, workdir=None, seed=0,
                           show_progress=False, defense_meta=ev.defense_identity(path, d))
    j = res.to_json()
    assert j["draws"] == 5
    assert j["clean_accuracy"] == j["base_clean_accuracy"] and j["robust_accuracy"] == j["base_robust_accuracy"]
    assert j["worst_case"] == j["worst_case_majority"] == j["worst_case_all_draws"] == j["base_worst_case"]
    assert j["worst_case_std"] == 0
