"""CLI conventions: one-line errors with exit 2, IGD_DEBUG tracebacks, --json purity, the console script."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def test_usage_errors_are_one_line(cli):
    for args in (["layers", "--bogus"], ["no-such-command"], ["layers", "--device", "tpu"],
                 ["layers", "--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["x"]):
        r = cli(*args)
        assert r.code == 2, args
        assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r.err
        assert r.out == ""


def test_debug_shows_traceback(cli, monkeypatch):
    monkeypatch.setenv("IGD_DEBUG", "1")
    r = cli("inspect", "missing.safetensors")
    assert r.code == 2 and "Traceback" in r.err and r.err.strip().endswith("error: missing.safetensors: no such file")


def test_console_script_json_is_one_object(tmp_path):
    """The installed console script: --json prints exactly one JSON object; help and version work."""
    exe = [sys.executable, "-m", "igd_cli"]
    out = subprocess.run(exe + ["layers", "--model", "demo", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["default_layer"] == "block3"
    assert subprocess.run(exe + ["--version"], capture_output=True, text=True).stdout.startswith("igd ")
    bad = subprocess.run(exe + ["inspect", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stdout == ""


def test_help_reads_right(cli):
    """Issue 14.5: igd --help shows a whole summary per command; every --help runs; the pipeline's budget options
    say that their defaults come from --preset; --eps says what it is for and where its default comes from."""
    from igd_cli.commands import MODULES

    r = cli("--help")
    assert r.code == 0
    listed = r.out.split("Commands:", 1)[1].split("Examples:")[0].strip().splitlines()
    assert len(listed) == len(MODULES) and not any(ln.rstrip().endswith("...") for ln in listed), listed
    for command in ("rank", "calibrate-k", "attack", "defend-eval", "pipeline", "audit", "merge", "inspect",
                    "layers", "report", "analyze"):
        assert cli(command, "--help").code == 0, command
    listed = cli("analyze", "--help").out.split("Commands:", 1)[1].split("Examples:")[0].strip().splitlines()
    assert len(listed) == 3 and not any(ln.rstrip().endswith("...") for ln in listed), listed
    flat = " ".join(cli("pipeline", "--help").out.split())
    for what in ("first N test images", "attack iterations", "random restarts", "RayS/Square queries",
                 "EoT samples per step"):
        assert f"{what} (default: the --preset's" in flat, what
    # click may wrap a line after a hyphen ("--threat-" / "model"): join those before comparing
    flat = " ".join(re.sub(r"(?<=\w)-\n\s*", "-", cli("attack", "--help").out).split())
    assert "--threat-model L2" in flat and "zoo entry's" in flat
    assert "--adv FILE" in " ".join(cli("defend-eval", "--help").out.split())


def test_l2_default_eps(resnet18_path):
    """With --threat-model L2 the per-data-set default ε is the l2 one (0.5 on CIFAR), not the l-inf 8/255."""
    from igd_cli.common import open_target

    assert open_target(str(resnet18_path), "resnet18", "cifar10", "L2", "cpu").default_eps() == 0.5
    assert open_target(str(resnet18_path), "resnet18", "cifar10", "Linf", "cpu").default_eps() == 8 / 255
