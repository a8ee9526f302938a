"""The explicit package list in pyproject.toml names every package folder, so a wheel install is complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(conf["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "igd_cli").rglob("__init__.py")}
    found = {f for f in found if "__pycache__" not in f}
    assert found | {"igd_cli._demo"} == listed
    assert (ROOT / conf["tool"]["setuptools"]["package-dir"]["igd_cli._demo"] / "demo.safetensors").exists()
