"""``--adv`` values: files, or folders standing for every adversarial set in them.

A pipeline's ``adv/`` folder or a cluster run's merged sets can be passed as one ``--adv DIR`` instead of
one ``--adv FILE`` per set.

>>> expand_adv([Path("runs/demo/adv"), Path("extra/apgd-ce.safetensors")])  # doctest: +SKIP
[PosixPath('runs/demo/adv/aa.safetensors'), ..., PosixPath('extra/apgd-ce.safetensors')]
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .artifacts import read_metadata
from .errors import IgdError


def adversarial_sets_in(folder: Path) -> list[Path]:
    """The adversarial artifacts directly in ``folder`` (``*.safetensors`` of kind ``adversarial``), by name.

    Other files (masks, reports, locks, temporaries) are passed over; a ``.safetensors`` that cannot be read is
    an error, since a set that is silently left out would change the worst case.
    """
    return sorted(p for p in folder.glob("*.safetensors")
                  if p.is_file() and not p.name.startswith(".") and read_metadata(p).get("kind") == "adversarial")


def expand_adv(values: Iterable[str | Path]) -> list[Path]:
    """Each ``--adv`` value as files: a file stays itself, a folder becomes the adversarial sets in it.

    A folder without any adversarial set is a one-line error (``IgdError``); a file is checked later, where it
    is loaded. The same file named twice (directly and through its folder) is kept once.
    """
    out: list[Path] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            found = adversarial_sets_in(path)
            if not found:
                raise IgdError(f"--adv {path}: a folder without adversarial sets (no .safetensors of kind "
                               f"adversarial in it)")
            out.extend(found)
        else:
            out.append(path)
    seen: set[Path] = set()
    unique = []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique
