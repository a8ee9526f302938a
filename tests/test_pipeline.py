"""igd pipeline: one command for every stage, and a rerun that only re-reads results."""

from __future__ import annotations

import pytest
import torch

import igd_cli.attacks.base as attacks_base
import igd_cli.evaluate as evaluate
import igd_cli.pipeline as pipeline
from igd_cli.artifacts import load_artifact
from igd_cli.ranking import METHODS

from .conftest import digits_safetensors

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
    assert d["randomized"]  # the defence is still random: one draw does not make it deterministic
    assert "single-draw protocol" in " ".join(cli("pipeline", "--out", out, *TINY, "--protocol", "single-draw").out.split())
    assert d["stages"] == {"rank": "reused", "calibrate": "reused", "transfer": "reused", "defend-eval": "computed"}
    assert all(randomized for _, randomized in calls)  # at most the attack on the defended model reran


def test_pipeline_refuses_to_rank_on_its_evaluation_file(tmp_path, cli, monkeypatch):
    """Issue 14.2: a tensor file has no splits, so without --probe-dataset the pipeline would rank on the very
    images it calibrates and attacks on: refused in one line before any ranking, also for a copy of the file."""
    for name, m in list(METHODS.items()):
        monkeypatch.setitem(METHODS, name, type(m)(m.name, m.description, m.params, _forbid(monkeypatch, "ranking")))
    test = digits_safetensors(tmp_path, "test")
    r = cli("pipeline", "--dataset", test, "--out", tmp_path / "run", *TINY)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert r.err.startswith(f"error: --dataset {test} is a file without a training split")
    assert "--probe-dataset" in r.err and "--allow-overlap" in r.err
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(test.read_bytes())
    r = cli("pipeline", "--dataset", test, "--probe-dataset", copy, "--out", tmp_path / "run", *TINY)
    assert r.code == 2 and r.err.startswith(f"error: --probe-dataset {copy}: the same images")
    assert "--allow-overlap" in r.err


def test_check_probe_overlap(tmp_path):
    from igd_cli.data import load_dataset
    from igd_cli.errors import IgdError

    test, train = digits_safetensors(tmp_path, "test"), digits_safetensors(tmp_path, "train")
    ev = load_dataset(str(test), "test")
    with pytest.raises(IgdError, match="without a training split"):
        pipeline.check_probe_overlap(load_dataset(str(test), "train", 10), ev, pipeline.PipelineConfig())
    pipeline.check_probe_overlap(load_dataset(str(test), "train", 10), ev, pipeline.PipelineConfig(allow_overlap=True))
    pipeline.check_probe_overlap(load_dataset(str(train), "train", 10), ev,
                                 pipeline.PipelineConfig(probe_dataset=str(train)))
    pipeline.check_probe_overlap(load_dataset("digits", "train"), load_dataset("digits", "test"),
                                 pipeline.PipelineConfig())


def test_pipeline_probe_dataset(tmp_path, cli):
    """--probe-dataset ranks on its images (the same importance as igd rank on them); the probe set reaches the
    importance, the mask, the report and the JSON, and the log no longer calls file images training images."""
    train, test = digits_safetensors(tmp_path, "train"), digits_safetensors(tmp_path, "test")
    out = tmp_path / "run"
    r = cli("pipeline", "--dataset", test, "--probe-dataset", train, "--out", out, *TINY, "--json")
    assert r.code == 0, r.err
    j = r.json()
    want = {"dataset": str(train), "split": "train", "n": 120}
    assert {k: j["probe"][k] for k in want} == want and j["probe"]["file"] is True
    assert "training images" not in r.err and f"on 120 images of {train}" in r.err
    imp = load_artifact(j["paths"]["importance"], kind="importance")
    assert imp.meta["data"] == want
    assert load_artifact(j["paths"]["mask"], kind="mask").meta["probe"] == want
    assert load_artifact(j["paths"]["report"], kind="eval-report").meta["probe"] == want
    # the ranking is the one igd rank computes on the first 120 training digits (the file holds the same images)
    ref = tmp_path / "ref.safetensors"
    assert cli("rank", "--n-probe", 120, "--batch-size", 64, "--out", ref).code == 0
    # same pixels; float32 rounding may differ (sklearn's digits tensor has channel stride 1, which oneDNN
    # reads as channels-last, and picks another convolution kernel)
    assert torch.allclose(imp["importance"], load_artifact(ref)["importance"], rtol=0, atol=1e-6)


def test_pipeline_without_eps_fails_before_ranking(tmp_path, cli, monkeypatch, demo):
    """Issue 14.3: the pipeline's attacks need ε; when neither --eps nor the model nor the data set gives one, it
    says so before the ranking runs, not after it."""
    for name, m in list(METHODS.items()):
        monkeypatch.setitem(METHODS, name, type(m)(m.name, m.description, m.params, _forbid(monkeypatch, "ranking")))
    weights = tmp_path / "demo-cnn.pt"
    torch.save(demo.model.state_dict(), weights)
    r = cli("pipeline", "--model", weights, "--arch", "demo-cnn", "--dataset", digits_safetensors(tmp_path, "test"),
            "--out", tmp_path / "run", *TINY, "--allow-overlap")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "pass --eps" in r.err and "attacks" in r.err
