"""benchmarks/bench_gpu.py runs end to end in --tiny mode on the CPU (so that it cannot rot before a GPU runs it):
its JSON has every stage of every model, and every ratio is a positive finite number."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
STAGES = {"forward", "channels-last", "lo-ir", "defended", "calibrate-k"}


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gpu_tiny_runs_and_writes_its_results(tmp_path, igd_home):
    bench = _load()
    bench.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path)])
    res = json.loads((tmp_path / "bench-gpu-cpu-tiny.json").read_text())
    md = (tmp_path / "bench-gpu-cpu-tiny.md").read_text()
    # the results file names no path of this machine: the --out-dir it was given is written under $TMPDIR
    assert str(tmp_path) not in (tmp_path / "bench-gpu-cpu-tiny.json").read_text() + md
    assert res["command"].endswith("--out-dir $TMPDIR/" + str(tmp_path.relative_to(tempfile.gettempdir())))
    assert res["mode"] == "tiny" and res["device_kind"] == "cpu" and res["uptime"] is not None
    assert set(res["models"]) == {"resnet18", "wrn-34-10", "resnet50"}
    for name, m in res["models"].items():
        assert {r["stage"] for r in m["stages"]} == STAGES, name
        assert "fp32" in m["precisions"]
        layers = {r["layer"] for r in m["stages"] if r["stage"] == "lo-ir"}
        assert layers == set(m["n_neurons"]) and len(layers) == 2, name  # penultimate and the stage before
        for r in m["stages"]:
            assert r["peak_gpu_mb"] is None  # no CUDA: null, not a made-up number
            assert r["seconds"] > 0 and r["images_per_s"] > 0
            if r["stage"] != "forward":
                assert math.isfinite(r["ratio"]) and r["ratio"] > 0 and r["ratio_of"]
            if r["stage"] == "lo-ir" and r["precision"] == "fp32":  # the fast rows are the literal ones
                assert r["max_abs_diff_vs_literal"] < 1e-3
    w = res["iwwc_vs_autoattack"]
    assert w["n_images"] == 4 and w["iwwc_seconds"] > 0 and w["autoattack_seconds"] > 0
    assert 0.0 <= w["autoattack_robust_accuracy"] <= 1.0
    ratios = res["ratios"]
    assert "resnet18/iw-wc-vs-autoattack/fp32" in ratios and "resnet50/lo-ir/model.layer3/fp32" in ratios
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in ratios.values())
    assert "| model | stage | layer | precision |" in md and "IW-WC vs standard AutoAttack" in md
