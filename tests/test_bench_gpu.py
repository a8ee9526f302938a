"""benchmarks/bench_gpu.py runs end to end in --tiny mode on the CPU (so that it cannot rot before a GPU runs it):
its JSON has every stage of every model with the median and spread of its timed runs and the batch each used, the
numerics, every ratio a positive finite number, the literal LO-IR scaled without its base forward, bf16 rankings
compared with fp32, and IW-WC against AutoAttack on an adversarially trained model with its survivors."""

from __future__ import annotations

import importlib
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
STAGES = {"forward", "channels-last", "lo-ir", "defended", "calibrate-k"}


def _load():
    """benchmarks/bench_gpu.py as a module (benchmarks/ on the path: it imports its neighbours by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("bench_gpu")


def test_bench_gpu_tiny_runs_and_writes_its_results(tmp_path, igd_home):
    bench = _load()
    bench.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "bench-gpu-cpu-tiny.json").read_text())
    md = (tmp_path / "bench-gpu-cpu-tiny.md").read_text()
    # the results file names no path of this machine: the --out-dir it was given is written under $TMPDIR
    assert str(tmp_path) not in (tmp_path / "bench-gpu-cpu-tiny.json").read_text() + md
    assert res["command"].endswith("--out-dir $TMPDIR/" + str(tmp_path.relative_to(tempfile.gettempdir())))
    assert res["mode"] == "tiny" and res["device_kind"] == "cpu" and res["uptime"] is not None
    nm = res["numerics"]
    assert nm["device_type"] == "cpu" and nm["torch"] == torch.__version__ and nm["tf32"] is False
    assert {"cuda", "cudnn", "deterministic", "tf32", "mode"} <= set(nm)
    assert set(res["models"]) == {"resnet18", "wrn-34-10", "resnet50"}
    for name, m in res["models"].items():
        assert {r["stage"] for r in m["stages"]} == STAGES, name
        assert "fp32" in m["precisions"] and m["repeats"] == 2
        layers = {r["layer"] for r in m["stages"] if r["stage"] == "lo-ir"}
        assert layers == set(m["n_neurons"]) and len(layers) == 2, name  # penultimate and the stage before
        assert all(c["batch_size"] == 8 for c in m["batches"].values())  # auto on a CPU: the default
        for r in m["stages"]:
            assert r["peak_gpu_mb"] is None  # no CUDA: null, not a made-up number
            assert len(r["runs"]) == 2 and r["seconds_min"] <= r["seconds"] <= r["seconds_max"]
            assert r["seconds"] > 0 and r["images_per_s"] > 0 and r["batch"] == 8
            if r["stage"] != "forward":
                assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ratio_of"]
            if r["stage"] == "lo-ir":
                # R + 1 forwards for R rows, L + 1 timed: the base forward is not counted as an ablation
                # both written to 4 decimals: the scaled one's rounding, and the unscaled one's times the factor
                factor = (r["rows"] + 1) / (r["literal_rows_timed"] + 1)
                assert r["literal_seconds_scaled"] == pytest.approx(
                    r["literal_seconds"] * factor, rel=1e-6, abs=0.5e-4 * (factor + 1) + 1e-9)
                if r["precision"] == "fp32":  # the fast rows are the literal ones
                    assert r["max_abs_diff_vs_literal"] < 1e-3
                else:  # reduced-precision rankings compared with fp32's
                    assert 0.0 <= r["agreement_vs_fp32"]["worst"] <= r["agreement_vs_fp32"]["mean"] <= 1.0
    w = res["iwwc_vs_autoattack"]
    assert w["robust_model"] == "demo" and w["n_images"] == 4 and w["iwwc"]["seconds"] > 0
    assert w["autoattack"]["seconds"] > 0 and 0.0 <= w["autoattack_robust_accuracy"] <= 1.0
    # the adversarially trained demo model keeps images robust, and the survivors of each attack are recorded
    after = w["autoattack_robust_after"]
    assert list(after)[0] == "clean" and "apgd-ce" in after and after["clean"]["images"] >= 1
    assert set(w["iwwc_columns"]) >= {"aa", "rays", "apgd-eot"}
    assert all(0 <= c["attacked_images"] <= 4 for c in w["iwwc_columns"].values())
    ratios = res["ratios"]
    assert "demo/iw-wc-vs-autoattack/fp32" in ratios and "resnet50/lo-ir/model.layer3/fp32" in ratios
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in ratios.values())
    assert "| model | stage | layer | precision | batch |" in md and "IW-WC vs standard AutoAttack" in md


def test_staged_images_are_the_same_images_and_identity(digits_test):
    bench = _load()
    staged = bench.staged(digits_test, torch.device("cpu"))
    assert staged.identity() == digits_test.identity() and len(staged) == len(digits_test)
    a, b = staged.get(3, 9), digits_test.get(3, 9)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)


def test_timings_are_medians_of_the_repeats():
    bench = _load()
    calls = []
    t = bench.measure(lambda: calls.append(1) or len(calls), torch.device("cpu"), repeats=3, warmup=1)
    assert len(calls) == 4 and len(t.runs) == 3 and t.result == 4  # one untimed warm-up, three timed runs
    js = t.to_json(10)
    assert js["seconds"] == round(sorted(t.runs)[1], 4) and js["peak_gpu_mb"] is None


def test_autoattack_survivors_are_read_from_its_log():
    bench = _load()
    log = bench.AutoAttackLog()
    import logging

    for msg in ("initial accuracy: 80.00%", "robust accuracy after APGD-CE: 45.00% (total time 1.0 s)",
                "robust accuracy after APGD-T: 42.50% (total time 2.0 s)", "apgd-ce - 1/1 - 3 out of 8 successfully"):
        log.emit(logging.LogRecord("auto-attack", logging.DEBUG, __file__, 1, msg, None, None))
    assert log.after == {"clean": 0.8, "apgd-ce": 0.45, "apgd-t": 0.425}
