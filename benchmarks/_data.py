"""Where the benchmarks find the real data files: ``--data-dir``, else ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``
(igd's own rule, :func:`igd_cli.data.data_dir`); nothing outside the repository or the user's cache is assumed.
How those files are made (``SUBSETS``, ``benchmarks/make_subsets.py``), and how a results file names them and every
other path: :func:`write_results` records no path of the machine it ran on.

    ap = argparse.ArgumentParser(); add_data_dir(ap); args = ap.parse_args()
    train = data_file("cifar10-train-4660.safetensors", args.data_dir)  # exits with one line when absent
    write_results(args.out, result, args.data_dir)  # paths made portable, data named by their recipe
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from igd_cli.artifacts import atomic_write_bytes  # noqa: E402
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


@dataclass(frozen=True)
class Subset:
    """A CIFAR-10 tensor file the benchmarks use: the first ``per_batch`` images of each official batch file."""

    batches: tuple[str, ...]
    per_batch: int
    source: str  # its metadata ``source``
    sha256: str  # of the file benchmarks/make_subsets.py writes


#: the data files of the benchmarks and of the ResNet-18 figures, all made by ``RECIPE``
SUBSETS: dict[str, Subset] = {
    "cifar10-test-846.safetensors": Subset(
        ("test_batch",), 846, "CIFAR-10 test_batch, first 846 images in official order",
        "7262a71dadb905e40c6cf7a400abda52d528907899ba5bc2f8f5e605eb8cb9b0"),
    "cifar10-train-4660.safetensors": Subset(
        tuple(f"data_batch_{i}" for i in range(1, 6)), 932,
        "CIFAR-10 data_batch_1..5, first 932 images of each in official order",
        "d3091b0732de3eb5c86ec5e65cb3a5cae74545dcbf75d80c1074e8df19340722"),
}
RECIPE = "igd fetch --dataset cifar10 && python benchmarks/make_subsets.py"
_SUBSET_PATH = re.compile(r"[^\s\"'=,;()]*/(" + "|".join(re.escape(n) for n in SUBSETS) + r")")


def portable(obj: Any, data_folder: str | Path | None = None) -> Any:
    """``obj`` (JSON-like) with no path of this machine in its strings: the repository's files relative to it, a
    data file of ``SUBSETS`` by its name alone, the data folder as ``$IGD_DATA_DIR``, pyautoattack's files as
    ``pyautoattack/…``, the temporary folder as ``$TMPDIR`` and the home folder as ``~``."""
    if isinstance(obj, dict):
        return {k: portable(v, data_folder) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, data_folder) for v in obj]
    if not isinstance(obj, str):
        return obj
    obj = _SUBSET_PATH.sub(r"\1", obj)
    for folder, short in _prefixes(data_folder):
        # the folder itself, or followed by "/": not a longer name that starts with it (/tmp vs /tmpx)
        obj = re.sub(r"(?<![\w./~$-])" + re.escape(folder) + r"(/|(?![\w.-]))",
                     lambda m: short if m.group(1) else short.rstrip("/") or ".", obj)
    return obj


def _prefixes(data_folder: str | Path | None) -> list[tuple[str, str]]:
    """(absolute folder, what a results file writes instead), the most specific first."""
    import pyautoattack

    named = {str(ROOT): "", str(data_dir(data_folder)): "$IGD_DATA_DIR/",
             str(Path(pyautoattack.__file__).resolve().parent): "pyautoattack/",
             tempfile.gettempdir(): "$TMPDIR/", str(Path.home()): "~/"}
    pairs = {(form, v) for k, v in named.items() for form in (k, os.path.realpath(k)) if form != "/"}
    return sorted(pairs, key=lambda kv: (-len(kv[0]), kv[0]))


def data_references(obj: Any) -> dict[str, dict[str, str]]:
    """The ``SUBSETS`` files ``obj`` names, each with its sha256 and the command that makes it."""
    text = json.dumps(obj)
    return {name: {"sha256": s.sha256, "made_by": RECIPE} for name, s in SUBSETS.items() if name in text}


def write_results(path: str | Path, obj: Any, data_folder: str | Path | None = None) -> Any:
    """Write a results file (JSON, atomically): :func:`portable` paths, and under ``data_files`` the data files it
    names (for a list, in each element that names one). Returns what was written."""
    obj = portable(obj, data_folder)
    if isinstance(obj, dict) and data_references(obj):
        obj["data_files"] = data_references(obj)
    elif isinstance(obj, list):
        obj = [{**e, "data_files": data_references(e)} if isinstance(e, dict) and data_references(e) else e
               for e in obj]
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, default=str) + "\n").encode())
    return obj


def command_line(script: str, argv: list[str] | None) -> str:
    """``python benchmarks/SCRIPT ARGS`` as given (``argv`` None: this process's); :func:`write_results` makes its
    paths portable."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join([f"python benchmarks/{script}", *map(str, args)])
