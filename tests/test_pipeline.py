"""igd pipeline: one command for every stage, and a rerun that only re-reads results."""

from __future__ import annotations

import pytest

import igd_cli.attacks.base as attacks_base
import igd_cli.evaluate as evaluate
import igd_cli.pipeline as pipeline
from igd_cli.artifacts import load_artifact
from igd_cli.ranking import METHODS

TINY = ["--n-probe", "120", "--n-examples", "16", "--attack", "aa", "--steps", "2", "--queries", "20",
        "--batch-size", "64"]


def _forbid(monkeypatch, what: str):
    def boom(*a, **k):
        raise AssertionError(f"{what} ran on a rerun that should only re-read results")

    return boom


def test_pipeline_runs_then_reuses_everything(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    r = cli("pipeline", "--out", out, *TINY, "--json")
    assert r.code == 0, r.err
    first = r.json()
    assert first["stages"] == {"rank": "computed", "calibrate": "computed", "transfer": "computed",
                               "defend-eval": "computed"}
    for key in ("base_clean_accuracy", "clean_accuracy", "base_worst_case", "worst_case", "k"):
        assert key in first
    assert 1 <= first["k"] <= 128 and first["n_examples"] == 16
    assert set(first["robust_accuracy"]) == {"aa"} and set(first["base_robust_accuracy"]) == {"aa"}
    imp = load_artifact(first["paths"]["importance"], kind="importance")
    mask = load_artifact(first["paths"]["mask"], kind="mask")
    report = load_artifact(first["paths"]["report"], kind="eval-report")
    assert imp.meta["method"] == "lo-ir" and mask.meta["k"] == first["k"]
    assert report.meta["attacks_run"] == ["base:aa", "defended:aa"]
    # the defence is randomized: scored by repeated draws; the report counts each image's correct final draws
    assert first["protocol"] == "draws" and first["draws"] == 5 and first["randomized"]
    for key in ("worst_case_std", "worst_case_majority", "worst_case_all_draws", "robust_accuracy_std"):
        assert key in first
    cols = report.meta["columns"]
    worst = report["correct"][cols.index("defended:worst_case")]
    assert int(worst.max()) <= 5 and worst.sum().item() / (5 * 16) == pytest.approx(first["worst_case"])
    assert report["defended_draws"].shape == (2, 10, 16)  # clean and AA, 5 final + 5 selection draws

    # second run: nothing may be ranked, calibrated or attacked
    for name, m in list(METHODS.items()):
        monkeypatch.setitem(METHODS, name, type(m)(m.name, m.description, m.params, _forbid(monkeypatch, "ranking")))
    monkeypatch.setattr(pipeline, "run_calibration", _forbid(monkeypatch, "calibrate-k"))
    monkeypatch.setattr(evaluate, "run_attack", _forbid(monkeypatch, "an attack"))
    monkeypatch.setattr(attacks_base, "run_attack", _forbid(monkeypatch, "an attack"))
    r2 = cli("pipeline", "--out", out, *TINY, "--json")
    assert r2.code == 0, r2.err
    second = r2.json()
    assert second["stages"] == {"rank": "reused", "calibrate": "reused", "transfer": "reused",
                                "defend-eval": "reused"}
    for key in ("base_clean_accuracy", "clean_accuracy", "base_worst_case", "worst_case", "k", "robust_accuracy"):
        assert second[key] == first[key]


def test_pipeline_changed_k_reuses_ranking_and_transfer_sets(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    assert cli("pipeline", "--out", out, *TINY, "--k", "4", "--json").code == 0
    calls = []
    real = evaluate.run_attack

    def spy(atk, data, **kw):
        calls.append(type(atk).__name__)
        return real(atk, data, **kw)

    monkeypatch.setattr(evaluate, "run_attack", spy)
    r = cli("pipeline", "--out", out, *TINY, "--k", "16", "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["k"] == 16
    assert d["stages"] == {"rank": "reused", "calibrate": "computed", "transfer": "reused",
                           "defend-eval": "computed"}
    assert len(calls) == 1  # only AutoAttack on the new defended model; the base set came from adv/


def test_pipeline_bad_input(tmp_path, cli):
    r = cli("pipeline", "--out", tmp_path / "x", "--attack", "square")
    assert r.code == 2 and r.err.startswith("error: --attack square")
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("pipeline", "--out", f)
    assert r.code == 2 and "is a file" in r.err


def test_pipeline_single_draw_protocol_rescores_without_attacking_the_base_model(tmp_path, cli, monkeypatch):
    out = tmp_path / "run"
    assert cli("pipeline", "--out", out, *TINY, "--json").code == 0
    calls = []
    real = evaluate.run_attack

    def spy(atk, data, **kw):
        calls.append((type(atk).__name__, atk.randomized))
        return real(atk, data, **kw)

    monkeypatch.setattr(evaluate, "run_attack", spy)
    r = cli("pipeline", "--out", out, *TINY, "--protocol", "single-draw", "--json")
    assert r.code == 0, r.err
    d = r.json()
    assert d["protocol"] == "single-draw" and d["draws"] == 1 and d["worst_case_std"] == 0
    assert d["stages"] == {"rank": "reused", "calibrate": "reused", "transfer": "reused", "defend-eval": "computed"}
    assert all(randomized for _, randomized in calls)  # at most the attack on the defended model reran
