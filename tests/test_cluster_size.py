"""cluster/slurm/size.py: --shards and --time for M images from a pilot run's task logs, checked against the
arithmetic done by hand on a made-up pilot (no scheduler needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = REPO / "cluster" / "slurm" / "size.py"


def _pilot(tmp_path: Path) -> Path:
    run = tmp_path / "pilot"
    (run / "cluster").mkdir(parents=True)
    (run / "logs").mkdir()
    (run / "cluster" / "plan.json").write_text(json.dumps({"n_examples": 40, "n_neurons": 512, "shards": 2}))
    logs = {  # step.job_task.log: what the tasks printed (other lines too)
        "rank.7_0.log": [{"piece": "rank-0-256", "neurons": [0, 256], "skipped": False, "seconds": 51.2}],
        "rank.7_1.log": [{"piece": "rank-256-512", "neurons": [256, 512], "skipped": False, "seconds": 64.0}],
        "merge-importance.8.log": [{"piece": "rank", "seconds": 3.0}],
        "calibrate.9.log": [{"piece": "calibrate", "k": 5, "seconds": 8.0}],
        "attack.10_0.log": [{"piece": "transfer-0-of-2", "positions": [0, 20], "seconds": 100.0}],
        "attack.10_1.log": [{"piece": "transfer-1-of-2", "positions": [20, 40], "seconds": 120.0}],
        # task 0 of the evaluation ran twice: its first attempt computed, the second skipped (not a rate)
        "evaluate.11_0.log": [{"piece": "defend-0-of-2", "positions": [0, 20], "skipped": False, "seconds": 300.0},
                              {"piece": "defend-0-of-2", "positions": [0, 20], "skipped": True, "seconds": 0.5}],
        "evaluate.11_1.log": [{"piece": "defend-1-of-2", "positions": [20, 40], "skipped": False, "seconds": 200.0}],
        "merge-eval.12.log": [{"piece": "merge", "seconds": 2.0}],
    }
    for name, recs in logs.items():
        lines = ["[2026-11-28T09:00:00Z igd-x 10_0] igd pipeline --piece x", "some progress line"]
        (run / "logs" / name).write_text("\n".join(lines + [json.dumps(r) for r in recs]) + "\n")
    return run


def _size(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SIZE), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_shards_and_time_follow_the_slowest_rate(tmp_path):
    run = _pilot(tmp_path)
    r = _size(run, "--images", 10000, "--time", "04:00:00", "--margin", 2, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # slowest evaluation rate: 300 s / 20 images = 15 s per image; ×2 margin must fit 4 h = 14400 s per task
    per_image = 15.0
    shards = out["shards"]
    assert per_image * math.ceil(10000 / shards) * 2 <= 14400  # it fits ...
    assert per_image * math.ceil(10000 / (shards - 1)) * 2 > 14400 or shards == 1  # ... and one fewer would not
    steps = out["steps"]
    assert steps["evaluate"]["seconds_per_unit"] == per_image and steps["evaluate"]["tasks_measured"] == 2
    assert steps["attack"]["seconds_per_unit"] == 6.0  # 120 s / 20 images
    assert steps["rank"]["seconds_per_unit"] == 0.25  # 64 s / 256 neurons
    assert steps["rank"]["predicted_task_seconds"] == round(0.25 * math.ceil(512 / shards), 1)
    assert steps["calibrate"]["seconds_per_unit"] == 0.2  # one job over the pilot's 40 images: 8 s / 40
    assert steps["calibrate"]["predicted_task_seconds"] == 8.0 * 10000 / 40  # ... and over the full run's
    assert steps["merge-importance"]["predicted_task_seconds"] == 3.0
    need = max(v["predicted_task_seconds"] for v in steps.values()) * 2
    h, m, s = map(int, out["time"].split(":"))
    assert (h * 60 + m) * 60 >= need > (h * 60 + m - 1) * 60  # rounded up to the minute
    assert out["fits"] and out["unsharded_over_limit"] == []
    assert f"--shards {shards} --time {out['time']}" in out["submit"]


def test_a_tight_limit_warns_and_calibration_over_the_limit_is_named(tmp_path):
    run = _pilot(tmp_path)
    r = _size(run, "--images", 10000, "--time", "00:00:20")  # 20 s: not even one image per task fits
    assert r.returncode == 0
    assert "warning: even one image per task exceeds" in r.stderr
    assert "warning: calibrate is one job" in r.stderr
    r = _size(run, "--images", 100, "--time", "1-00:00:00")  # a day: one shard, nothing over
    assert r.returncode == 0 and "warning" not in r.stderr and "--shards 1 " in r.stdout


def test_bad_input_is_one_error_line(tmp_path):
    r = _size(tmp_path, "--images", 10)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")
    assert "not a run folder" in r.stderr
    run = _pilot(tmp_path)
    for f in (run / "logs").glob("attack.*"):
        f.unlink()
    for f in (run / "logs").glob("evaluate.*"):
        f.unlink()
    r = _size(run, "--images", 10)
    assert r.returncode == 2 and "no finished attack or evaluate task" in r.stderr
    r = _size(_pilot(tmp_path / "b"), "--images", 10, "--time", "soon")
    assert r.returncode == 2 and r.stderr.strip() == "error: --time soon: expected [D-]HH:MM:SS"


def _documented(script: str) -> list[tuple[str, list[str]]]:
    """Every command line of README.md and docs/ that runs ``script`` (backslash continuations joined, fenced
    blocks only): (file:line, its arguments)."""
    import shlex

    out = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        lines, fenced = page.read_text().splitlines(), False
        for n, line in enumerate(lines, 1):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if fenced and script in line and not line.lstrip().startswith("#"):
                text, k = line, n
                while text.endswith("\\"):
                    text = text[:-1] + " " + lines[k].strip()
                    k += 1
                args = shlex.split(text, comments=True)
                out.append((f"{page.relative_to(REPO)}:{n}", args[args.index(next(a for a in args if script in a)) + 1:]))
    return out


def test_the_documented_size_and_submit_lines_parse():
    """The cluster lines README and docs/ show: size.py's with its own parser, submit.sh's driver options against
    the options its source accepts and the igd pipeline options after ``--`` with igd pipeline's parser."""
    import importlib.util
    import re

    import typer

    from igd_cli.cli import app
    from igd_cli.commands import register_all

    spec = importlib.util.spec_from_file_location("size", SIZE)
    size = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(size)
    sized = _documented("cluster/slurm/size.py")
    assert sized, "no size.py line found in README.md or docs/"
    for where, args in sized:
        size.parser().parse_args(args)  # exits (SystemExit) on an unknown or missing option
    register_all()
    pipeline = typer.main.get_command(app).commands["pipeline"]
    driver = set(re.findall(r"(--[a-z-]+)[|)]", (REPO / "cluster" / "slurm" / "submit.sh").read_text()))
    submitted = _documented("cluster/slurm/submit.sh")
    assert submitted, "no submit.sh line found in README.md or docs/"
    for where, args in submitted:
        cut = args.index("--")
        opts, i = [], 1  # args[0] is RUN_DIR; every driver option but --wait takes a value
        while i < cut:
            opts.append(args[i])
            i += 1 if args[i] == "--wait" else 2
        assert set(opts) <= driver, (where, set(opts) - driver)
        pipeline.make_context("igd pipeline", args[cut + 1:])  # raises on an unknown option
