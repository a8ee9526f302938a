"""What made a result besides its inputs: igd's own figure-making code (:func:`code_digest`) and the numerics it ran
with (:mod:`igd_cli.numerics`). Both are in every identity a cache or merge compares, and recorded in every
artifact and results JSON, so a run folder made by another igd, or pieces made with other numerics, are never
reused or merged as this run's.

The code digest is the igd version plus a sha256 of the package's source files, every module except those that
only parse options, print or draw (:data:`PRESENTATION`): an editable install whose ``noise.py`` changed is another
igd even at the same version, while a reworded ``--help`` or table leaves every cache valid.

Example::

    identity(target.device)     # {"igd_code": "0.1.0+3f2a...", "numerics": {"device_type": "cpu", ...}}
    difference(old_meta, identity(target.device))   # ("igd code", "0.1.0+3f2a...", "0.1.0+9c41...") or None
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch

from . import __version__, numerics

#: modules (paths under the package, a folder ends in ``/``) that cannot change a figure: the command line, its
#: rendering and the reference page generator. Every other module is in :func:`code_digest`.
PRESENTATION = ("cli.py", "commands/", "console.py", "errors.py", "report.py", "run_report.py", "eval_table.py",
                "reference.py", "audit/plots.py")
PACKAGE = Path(__file__).resolve().parent


def figure_modules(root: Path = PACKAGE) -> list[Path]:
    """The package's source files that can change a figure (all ``.py`` files but :data:`PRESENTATION`), sorted."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PRESENTATION):
            out.append(path)
    return out


@functools.lru_cache(maxsize=None)
def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in figure_modules(root):
        h.update(f"{path.relative_to(root).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def code_digest(root: Path | None = None) -> str:
    """``VERSION+DIGEST``: the igd version and the sha256 (16 hex digits) of :func:`figure_modules`' bytes,
    comments included (computed once per process)."""
    return f"{__version__}+{_digest(Path(root).resolve() if root is not None else PACKAGE)}"


def identity(device: torch.device | str) -> dict[str, Any]:
    """What every identity holds of how a result on ``device`` is made: ``igd_code`` and the ``numerics`` that can
    change a figure (:func:`igd_cli.numerics.identity`)."""
    return {"igd_code": code_digest(), "numerics": numerics.identity(device)}


def record(device: torch.device | str) -> dict[str, Any]:
    """What every artifact and results JSON records: ``igd_code`` and the full ``numerics`` record (device name,
    torch / CUDA / cuDNN versions, TF32, determinism)."""
    return {"igd_code": code_digest(), "numerics": numerics.record(device)}


def difference(have: Mapping[str, Any], want: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """Where ``have`` and ``want`` (artifact metadata, an identity, or a record) were made by other igd code or
    with other numerics: ``(what, have's value, want's value)`` for a one-line message; None when they agree."""
    a, b = have.get("igd_code"), want.get("igd_code")
    if a != b:
        return "igd code", str(a or "not recorded (an older igd)"), str(b or "not recorded (an older igd)")
    na, nb = numerics.identity_of(have.get("numerics")), numerics.identity_of(want.get("numerics"))
    if na != nb:
        return "numerics", numerics.describe(na), numerics.describe(nb)
    return None


def refusal(made: tuple[str, str, str]) -> str:
    """The words for a :func:`difference` where an artifact is not reused: ``made with igd code A, not this
    run's B``."""
    return f"made with {made[0]} {made[1]}, not this run's {made[2]}"


def comparable(meta: Mapping[str, Any], key: str) -> Any:
    """The value of ``key`` that identities compare: a ``numerics`` record reduced to what can change a figure."""
    value = meta.get(key)
    return numerics.identity_of(value) if key == "numerics" else value


__all__ = ["PACKAGE", "PRESENTATION", "code_digest", "comparable", "difference", "figure_modules", "identity",
           "record", "refusal"]
