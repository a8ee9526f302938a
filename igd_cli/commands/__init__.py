"""Command modules; importing one registers its commands on ``igd_cli.cli.app``."""

from __future__ import annotations

import importlib

#: command modules in the order their commands appear in ``igd --help``
MODULES = ["rank", "calibrate", "attack", "defend_eval", "pipeline", "merge", "inspect", "layers"]

_done = False


def register_all() -> None:
    global _done
    if _done:
        return
    for name in MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # a real missing dependency, not a command not written yet
                raise
    _done = True
