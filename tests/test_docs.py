"""The documentation stands on its own: the command reference is the code's current --help, and the site builds
strictly (no broken link, no page left out of the navigation) where mkdocs is installed (the docs extra; CI
installs it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_command_reference_is_current():
    from igd_cli.reference import cli_reference

    page = (ROOT / "docs" / "reference.md").read_text()
    assert page == cli_reference(), "docs/reference.md is stale: python -m igd_cli.reference > docs/reference.md"
    for command in ("rank", "calibrate-k", "attack", "defend-eval", "pipeline", "audit", "merge", "analyze shift"):
        assert f"## igd {command}\n" in page


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (pip install -e '.[docs]')")
def test_the_docs_site_builds_strictly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "reference" / "index.html").exists()
