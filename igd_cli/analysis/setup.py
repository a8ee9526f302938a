"""What every analysis shares: the model, images, attack budget and scoring protocol of one evaluation, the
identity of a defended variant built in memory (for the attack-set cache), and atomic JSON results.

Example::

    setup = EvalSetup(target, data, eps=0.2, budgets=Budgets(steps=10), workdir="runs/demo/adv")
    r = setup.evaluate(defense, mask_identity(mask, "block3", defense.settings()), attack="aa")
    r["robust_accuracy"]["aa"], r["robust_accuracy_std"]["aa"]   # mean ± std over draws when randomized
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..artifacts import atomic_write_bytes
from ..common import Target
from ..data import ImageSet
from ..defense import mask_identity, tensor_sha256  # noqa: F401  (their home is defense.py)
from ..errors import IgdError
from ..evaluate import Budgets, evaluate_defense
from ..scoring import DEFAULT_DRAWS


@dataclass
class EvalSetup:
    """One evaluation setting shared by the rows or points of an analysis: attack sets live in ``workdir`` (so the
    base-model transfer sets are computed once for all rows, and a point's sets are reused when it is asked
    again), randomized variants are scored with ``protocol``/``draws`` (:mod:`igd_cli.scoring`)."""

    target: Target
    data: ImageSet
    eps: float
    budgets: Budgets
    workdir: Path
    seed: int = 0
    batch_size: int = 128
    protocol: str = "draws"
    draws: int = DEFAULT_DRAWS
    show_progress: bool = True

    def evaluate(self, model: nn.Module | None, identity: dict[str, Any] | None, attack: str,
                 eps: float | None = None, budgets: Budgets | None = None) -> dict[str, Any]:
        """:func:`igd_cli.evaluate.evaluate_defense` of ``model`` (None: the base model alone) as JSON."""
        res = evaluate_defense(self.target, model, self.data, attack=attack, workdir=self.workdir,
                               budgets=budgets or self.budgets, eps=self.eps if eps is None else eps,
                               norm=self.target.threat_model, seed=self.seed,
                               batch_size=self.batch_size, defense_meta=identity, show_progress=self.show_progress,
                               protocol=self.protocol, draws=self.draws)
        return res.to_json()

    def describe(self) -> dict[str, Any]:
        return {"model": self.target.loaded.name, "model_fingerprint": self.target.loaded.fingerprint,
                "data": {"dataset": self.data.name, "split": self.data.split, "n": len(self.data)},
                "data_id": self.data.identity(), "norm": self.target.threat_model, "eps": self.eps, "budget": self.budgets.kwargs(), "seed": self.seed, "protocol": self.protocol,
                "draws": self.draws, "workdir": str(self.workdir)}


def write_json(path: str | Path, result: dict[str, Any]) -> Path:
    """Write an analysis result atomically as indented JSON."""
    path = Path(path)
    if path.is_dir():
        raise IgdError(f"{path}: is a directory")
    atomic_write_bytes(path, json.dumps(result, indent=1, default=str).encode())
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    """An analysis result written by :func:`write_json`, or a one-line error."""
    try:
        out = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise IgdError(f"{path}: not a readable analysis result ({type(exc).__name__})") from exc
    if not isinstance(out, dict):
        raise IgdError(f"{path}: not an analysis result")
    return out


#: evaluation images when none are given: all of the test split, at most this many (as igd pipeline)
DEFAULT_MAX_EXAMPLES = 1000


def make_setup(target: Target, out: str | Path, *, n_examples: int | None = None, data_dir: str | Path | None = None,
               eps: float | None = None, budgets: Budgets | None = None, seed: int = 0, batch_size: int = 128,
               protocol: str = "draws", draws: int = DEFAULT_DRAWS, show_progress: bool = True) -> EvalSetup:
    """The setup of an ``igd analyze`` command: the first ``n_examples`` test images (default all, at most
    1000), ε (default the model's), attack sets kept in ``OUT/adv`` (shared with ``igd pipeline --out OUT``)."""
    from ..common import check_classes
    from ..scoring import check_protocol

    check_protocol(protocol, draws, "igd analyze")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IgdError(f"--out {out}: is a file, expected a folder")
    data = target.data("test", n_examples, data_dir)
    if n_examples is None:
        data.n = min(DEFAULT_MAX_EXAMPLES, len(data))
    check_classes(target, data)
    eps = target.default_eps("the analysis's attacks and σ = ε/2") if eps is None else eps
    return EvalSetup(target, data, float(eps), budgets or Budgets(), out / "adv", seed=seed, batch_size=batch_size,
                     protocol=protocol, draws=draws, show_progress=show_progress)


def load_rankings(target: Target, paths: list[str | Path], data: ImageSet) -> dict[str, tuple[str, str, torch.Tensor]]:
    """``--importance`` files by name (their ranking method, or the file stem when two share one):
    name -> (path, layer, importance (N, C)), each checked against the model (fingerprint, layer, shape)."""
    from ..calibrate import load_importance

    if not paths:
        raise IgdError("--importance: give at least one importance artifact (igd rank)")
    shape = tuple(data.get(0, 1).x.shape[1:])
    out: dict[str, tuple[str, str, torch.Tensor]] = {}
    for p in paths:
        art, layer, imp = load_importance(p, target, None, shape)
        name = str(art.meta.get("method") or Path(p).stem)
        if name in out:
            name = Path(p).stem
        out[name] = (str(p), layer, imp)
    return out
