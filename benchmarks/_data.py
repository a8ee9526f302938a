"""Where the benchmarks find the real data files: ``--data-dir``, else ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``
(igd's own rule, :func:`igd_cli.data.data_dir`); nothing outside the repository or the user's cache is assumed.

    ap = argparse.ArgumentParser(); add_data_dir(ap); args = ap.parse_args()
    train = data_file("cifar10-train-4660.safetensors", args.data_dir)  # exits with one line when absent
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from igd_cli.data import data_dir  # noqa: E402

HELP = "folder of the data files (default: $IGD_DATA_DIR, else $IGD_HOME/data, i.e. ~/.cache/igd/data)"


def add_data_dir(ap: argparse.ArgumentParser) -> None:
    """The ``--data-dir DIR`` option every benchmark that reads real data takes."""
    ap.add_argument("--data-dir", type=Path, default=None, help=HELP)


def find_data_file(name: str, folder: str | Path | None = None) -> Path | None:
    """``name`` in the data folder, or None when it is not there."""
    path = data_dir(folder) / name
    return path if path.is_file() else None


def data_file(name: str, folder: str | Path | None = None) -> Path:
    """``name`` in the data folder; absent: one ``error:`` line naming the file to place and where, exit 2."""
    path = find_data_file(name, folder)
    if path is None:
        where = data_dir(folder)
        print(f"error: {name} not found: place it in {where} (or pass --data-dir DIR, or set IGD_DATA_DIR)",
              file=sys.stderr)
        raise SystemExit(2)
    return path


def command_line(script: str, argv: list[str] | None) -> str:
    """``python benchmarks/SCRIPT ARGS`` as a results file records it (``argv`` None: this process's): a path inside
    the repository relative to it, any other absolute path (a temporary folder) as ``TMP/<its name>``."""
    args = sys.argv[1:] if argv is None else list(argv)
    out = []
    for a in map(str, args):
        p = Path(a)
        if p.is_absolute():
            try:
                a = str(p.resolve().relative_to(ROOT))
            except ValueError:
                a = f"TMP/{p.name}"
        out.append(a)
    return " ".join([f"python benchmarks/{script}", *out])
