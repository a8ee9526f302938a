"""benchmarks/check_gpu.sh --cpu-dry-run: every check of the GPU node check runs on the CPU at tiny sizes and prints
one verdict line (the checks cannot rot before a GPU runs them); the sync counter attributes syncs to call sites
and finds the ones that sync every step."""

from __future__ import annotations

import collections
import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load():
    """benchmarks/check_gpu.py as a module (benchmarks/ on the path: it imports its neighbours by name)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module("check_gpu")


def test_cpu_dry_run_prints_one_verdict_per_check(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGD_NO_PROGRESS": "1", "PYTHON": sys.executable}
    r = subprocess.run([str(ROOT / "benchmarks" / "check_gpu.sh"), "--cpu-dry-run", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=1500)
    lines = r.stdout.strip().splitlines()
    mod = _load()
    assert [ln.split()[1].rstrip(":") for ln in lines[:-1]] == list(mod.CHECKS), r.stdout + r.stderr[-3000:]
    assert all(ln.startswith("PASS ") for ln in lines), r.stdout + r.stderr[-3000:]
    assert lines[-1].startswith("PASS check_gpu: 6 of 6 checks pass on cpu") and r.returncode == 0
    rec = json.loads((tmp_path / "check-gpu-cpu-dry-run.json").read_text())
    assert rec["dry_run"] and [c["name"] for c in rec["checks"]] == list(mod.CHECKS)
    assert (tmp_path / "bench-gpu-check-cpu-dry-run.json").exists()
    assert (tmp_path / "same-answer-cpu-dry-run.json").exists()


def test_no_cuda_is_one_error_line(capsys, tmp_path, monkeypatch):
    mod = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main(["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no CUDA device here (run with --cpu-dry-run to check the checks on the CPU)"]


def test_syncs_are_counted_per_call_site_and_per_step_sites_found():
    mod = _load()

    def workload(steps):
        for _ in range(steps):
            warnings.warn("called a synchronizing CUDA operation")  # per step: this line
        warnings.warn("called a synchronizing CUDA operation")  # once per call
        warnings.warn("something else")  # not a sync: not counted

    small = mod.sync_sites(lambda: workload(4), torch.device("cpu"))
    big = mod.sync_sites(lambda: workload(8), torch.device("cpu"))
    here = Path(__file__).as_posix()
    per_step = [s for s in big if big[s] == 8]
    assert len(per_step) == 1 and per_step[0].startswith(here) and sum(big.values()) == 9 and sum(small.values()) == 5
    assert list(mod.per_step_sites(small, big)) == per_step
    assert mod.per_step_sites(collections.Counter({"a:1": 2}), collections.Counter({"a:1": 2, "b:2": 1})) == \
        {"b:2": (0, 1)}


def test_the_docs_command_lines_of_the_gpu_scripts_parse():
    """Every ``python benchmarks/bench_gpu.py …``, ``benchmarks/check_gpu.sh …``, ``check_same_answer.py …`` and
    ``bench_precision.py …`` line in docs/gpu.md is accepted by the script's own parser."""
    import re
    import shlex

    _load()
    scripts = {"benchmarks/bench_gpu.py": "bench_gpu", "benchmarks/check_gpu.sh": "check_gpu",
               "benchmarks/check_gpu.py": "check_gpu", "benchmarks/check_same_answer.py": "check_same_answer",
               "benchmarks/bench_precision.py": "bench_precision"}
    text = (ROOT / "docs" / "gpu.md").read_text()
    blocks = [line.strip().split("#")[0] for line in text.splitlines() if line.startswith("    ")]
    prose = re.sub(r"```.*?```", "", "\n".join(ln for ln in text.splitlines() if not ln.startswith("    ")),
                   flags=re.S)
    commands = blocks + [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # inline: may wrap
    found = {}
    for command in commands:
        m = re.match(r"(?:python )?(benchmarks/[a-z_]+\.(?:py|sh))(.*)", command)
        if m is None or m.group(1) not in scripts:
            continue
        found.setdefault(m.group(1), []).append(command)
        importlib.import_module(scripts[m.group(1)]).parser().parse_args(shlex.split(m.group(2)))
    assert {"benchmarks/bench_gpu.py", "benchmarks/check_gpu.sh", "benchmarks/check_same_answer.py",
            "benchmarks/bench_precision.py"} <= set(found)
