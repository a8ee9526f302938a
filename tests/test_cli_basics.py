"""CLI conventions: one-line errors with exit 2, IGD_DEBUG tracebacks, --json purity, the console script."""

from __future__ import annotations

import json
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
