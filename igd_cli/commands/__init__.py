"""Command modules; importing one registers its commands on ``igd_cli.cli.app``."""

from __future__ import annotations

import importlib

#: command modules in the order their commands appear in ``igd --help``
MODULES = ["rank", "calibrate", "attack", "defend_eval", "pipeline", "audit", "analyze", "report", "merge",
           "inspect", "layers", "fetch"]

_done = False


def register_all() -> None:
    """Import every command module once (the CLI entry point calls this before parsing)."""
    global _done
    if not _done:
        for name in MODULES:
            importlib.import_module(f"{__name__}.{name}")
        _done = True
