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
    # the worst case is the per-image minimum over clean and every attack column
    cols = report.meta["columns"]
    worst = report["correct"][cols.index("defended:worst_case")].bool()
    assert worst.float().mean().item() == pytest.approx(first["worst_case"])

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
