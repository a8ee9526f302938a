"""The demo pipeline bench and the restarts bench run end to end at tiny sizes and write what the pages read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = ["--n-examples", "4", "--n-probe", "64", "--steps", "1", "--restarts", "1", "--queries", "10",
        "--eot-iter", "1", "--draws", "1", "--attack", "aa"]


def test_pipeline_bench_against_a_baseline_checkout(tmp_path, igd_home):
    """Both runs recorded, the ratio is theirs, the checkout named by its revision and not by its path."""
    out = tmp_path / "p.json"
    res = _load("bench_pipeline_demo").main(["--baseline-tree", str(ROOT), "--out", str(out), "--", *TINY])
    written = json.loads(out.read_text())
    assert written["result"]["n_examples"] == 4 and written["result"]["k"] >= 1
    assert written["baseline"]["result"]["worst_case"] == written["result"]["worst_case"]  # the same code twice
    assert written["ratio_wall_seconds"] == round(res["wall_seconds"] / res["baseline"]["wall_seconds"], 3)
    assert str(ROOT) not in out.read_text() and "--baseline-tree ../igd-" in written["command"]
    assert written["pipeline_command"].startswith("igd pipeline --out run --json --n-examples 4")


def test_restarts_bench_scores_both_ways_on_the_same_draws(tmp_path, igd_home):
    out = tmp_path / "r.json"
    res = _load("bench_restarts").main(["--n", "4", "--steps", "1", "--eot-iter", "1", "--restarts", "2",
                                        "--draws", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["n_images"] == 4 and len(written["each_single_run"]) == 2 and written["draws"] == 2
    for key in ("one_run_of_restarts", "single_runs_combined"):
        assert written[key]["n"] == 4 and written[key]["draws"] == 2 and written[key]["seconds"] >= 0
    assert 0 <= written["images_decided_differently"] <= 4 and written["k"] >= 1
    assert res["difference"] == written["one_run_of_restarts"]["mean"] - written["single_runs_combined"]["mean"]


def test_own_defenses_bench_splits_a_randomized_defences_gap(tmp_path, igd_home):
    """The example defences' benchmark at a tiny size: a randomized defence gets every candidate classified on a
    stream of its own and the same sets rescored at more draws; a deterministic one neither."""
    out = tmp_path / "o.json"
    _load("own_defenses").main(["--defenses", "smoothing,jpeg", "--n", "4", "--steps", "1", "--queries", "10",
                                "--eot-iter", "1", "--draws", "2", "--ref-steps", "1", "--ref-eot", "1",
                                "--check-draws", "4", "--more-draws", "3", "--out", str(out)])
    written = json.loads(out.read_text())
    smooth, jpeg = written["defenses"]["smoothing"], written["defenses"]["jpeg"]
    assert written["n"] == 4 and written["command"].startswith("python benchmarks/own_defenses.py --defenses")
    assert "many_draws" not in jpeg and "more_draws" not in jpeg and jpeg["no_gradient"] == ["aa", "apgd-eot"]
    assert set(smooth["std"]) == {"clean", *smooth["transfer"], *smooth["direct"], "adaptive"}
    assert all(v == 0 for v in jpeg["std"].values()) and jpeg["reference_std"] == 0  # deterministic: exact
    m = smooth["many_draws"]
    assert m["draws"] == 4 and set(m["columns"]) == {"clean", *smooth["transfer"], *smooth["direct"], "adaptive"}
    cols = m["columns"].values()
    assert min(cols) >= m["per_image_best_candidate"] - 1e-9 and m["worst_case_selected"] <= max(cols) + 1e-9
    assert m["columns"][m["best_column"]] == min(v for k, v in m["columns"].items() if k != "clean")
    assert sum(m["selected_from"].values()) == 4 and 0 <= m["reference"] <= 1
    assert smooth["more_draws"]["draws"] == 3 and set(smooth["more_draws"]["columns"]) == set(m["columns"]) - {"clean"}
    assert set(smooth["draws_margin"]["columns"]) == set(m["columns"]) - {"clean"} and "draws_margin" not in jpeg
    assert min(cols) <= m["worst_case_selected_draws_margin"] <= max(cols)
