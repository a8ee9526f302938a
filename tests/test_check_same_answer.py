"""benchmarks/check_same_answer.py: it compares figures and per-image decisions exactly, says what differs (which
figure, which images), prints one verdict per attack and exits 1 on any difference; a real quick run of an attack
that agrees today passes. (FAB-T on a randomized defence depends on the batch size until its noise keying is fixed:
not asserted here.)"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    """benchmarks/check_same_answer.py as a module (benchmarks/ on the path: it imports its neighbours by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("check_same_answer")


def _report(mod, robust=0.75, flip=None):
    bits = torch.ones(2, 4, 12, dtype=torch.uint8)
    if flip is not None:
        bits[1, 2, flip] = 0
    return mod.Report({"robust_accuracy": {"x": robust}, "n_examples": 12},
                      {"correct": bits[0], "y": torch.arange(12), "index": torch.arange(12), "defended_draws": bits})


def test_differences_name_the_figure_and_the_images():
    mod = _load()
    assert mod.differences(_report(mod), _report(mod)) == []
    d = mod.differences(_report(mod), _report(mod, robust=0.7167, flip=7))
    assert d == ['robust_accuracy: {"x": 0.75} vs {"x": 0.7167}', "defended_draws: 1 image(s) differ (positions [7])"]
    # a decision that differs while every figure agrees is still a difference
    assert mod.differences(_report(mod), _report(mod, flip=3)) == ["defended_draws: 1 image(s) differ (positions [3])"]


def test_one_verdict_per_attack_and_exit_1_on_a_difference(monkeypatch, capsys, tmp_path):
    mod = _load()
    monkeypatch.setattr(mod, "make_masks", lambda work, device, defences: {k: tmp_path / k for k in defences})

    def three_ways(attack, mask, work, **kw):
        big = _report(mod)
        small = _report(mod, robust=0.7167, flip=5) if attack == "fab-t" else _report(mod)
        return {"batch 5": small, "batch 64": big, "2 shards": _report(mod)}
    monkeypatch.setattr(mod, "evaluate_three_ways", three_ways)
    code = mod.main(["--quick", "--attacks", "apgd-ce", "fab-t", "--workdir", str(tmp_path / "w"),
                     "--out", str(tmp_path / "r.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1 and len(lines) == 3
    assert lines[0] == "PASS apgd-ce: k40-sigma0.1: same (75.00 %)"
    assert lines[1].startswith("FAIL fab-t: k40-sigma0.1: DIFFERS (batch 5 71.67 % / batch 64 75.00 % / 2 shards "
                               "75.00 %) batch 5 vs batch 64: robust_accuracy")
    assert "defended_draws: 1 image(s) differ (positions [5])" in lines[1]
    assert lines[2].startswith("FAIL same answer: 1 of 2 attacks agree") and lines[2].endswith("differ: fab-t")
    import json

    assert json.loads((tmp_path / "r.json").read_text())["differ"] == ["fab-t"]


def test_a_quick_run_of_an_attack_that_agrees_passes(capsys, tmp_path, monkeypatch):
    mod = _load()
    code = mod.main(["--quick", "--n-examples", "6", "--attacks", "fgsm", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0, out
    assert out[0].startswith("PASS fgsm: k40-sigma0.1: same (") and out[-1].startswith("PASS same answer: 1 of 1")
    # three runs, each in its own work folder: nothing was reused between them
    folder = tmp_path / "fgsm" / "k40-sigma0.1"
    assert {p.name for p in folder.iterdir() if p.is_dir()} == {"adv-batch5", "adv-batch64", "adv-shards"}
