"""What every check of ``igd audit`` shares: the audited model and its variants, the images, the presets' budgets,
and one place that obtains attack sets (reused from the work folder through :class:`igd_cli.evaluate.Evaluator`)
and scores them with the repeated-draw protocol (:mod:`igd_cli.scoring`).

Example::

    audit = Audit(target, data, eps=0.2, preset="quick", defense=load_defense(target, "mask.safetensors"),
                  mask_path="mask.safetensors", workdir="runs/demo/adv")
    score = audit.robust(["aa", "rays"])          # worst case over both, mean ± std over draws
    paired(score, audit.robust(["aa"]), "blackbox_margin").flag   # the audit's statistical rule
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn

from .. import contract
from ..attacks.base import is_randomized
from ..common import Target
from ..data import ImageSet
from ..errors import IgdError
from ..evaluate import DIRECT_RUN_ORDER, TRANSFER, Budgets, Evaluator, identity_of
from ..scoring import DEFAULT_DRAWS, Score, check_protocol, final_of_selected
from .thresholds import PRESETS, THRESHOLDS

#: the models an audit attacks: the audited one (the defence, or the base model without one), the base model,
#: the defence with frozen noise (check 8) and its baseline, IG-Defense's smoothing alone (check 10)
Which = Literal["audited", "base", "frozen", "smoothed"]


@dataclass(frozen=True, eq=False)
class Cell:
    """One figure of the audit: its final draws (R, n) per image and how to print it (``61.30 ± 1.80 %`` for a
    randomized model: mean ± std over draws)."""

    final: torch.Tensor  # (R, n) bool: each image's correctness in the final draws of its selected candidate

    @classmethod
    def of(cls, final: torch.Tensor) -> "Cell":
        return cls(final.detach().cpu())

    @property
    def score(self) -> Score:
        return Score.of(self.final)

    @property
    def per_image(self) -> torch.Tensor:
        """``p_i``: each image's correctness averaged over the final draws, (n,) float64."""
        return self.final.double().mean(0)

    @property
    def mean(self) -> float:
        return self.score.mean

    @property
    def std(self) -> float:
        return self.score.std

    def text(self) -> str:
        s = f"{100 * self.mean:.2f}"
        return (s + f" ± {100 * self.std:.2f}" if self.score.draws > 1 else s) + " %"

    def to_json(self) -> dict[str, Any]:
        sc = self.score
        return {"mean": sc.mean, "std": sc.std, "draws": sc.draws, "n": sc.n, "majority": sc.majority,
                "all_draws": sc.all_draws}


@dataclass(frozen=True)
class Test:
    """A comparison on the footing of :mod:`.thresholds`: the mean ``estimate`` of per-image values (paired
    differences for two figures), its standard error, the threshold, and the verdict's rule (``above``: flag when
    ``estimate − z·se > threshold``; ``below``: flag when ``estimate + z·se < threshold``)."""

    estimate: float
    se: float
    threshold: float
    z: float
    n: int
    rule: Literal["above", "below"]

    @property
    def flag(self) -> bool:
        if self.rule == "above":
            return self.estimate - self.z * self.se > self.threshold
        return self.estimate + self.z * self.se < self.threshold

    def text(self) -> str:
        """``+3.2 ± 1.1 pts`` (estimate ± standard error, in points)."""
        return f"{100 * self.estimate:+.1f} ± {100 * self.se:.1f} pts"

    def to_json(self) -> dict[str, Any]:
        return {"estimate": self.estimate, "se": self.se, "threshold": self.threshold, "z": self.z, "n": self.n,
                "rule": self.rule, "lower": self.estimate - self.z * self.se,
                "upper": self.estimate + self.z * self.se, "flag": self.flag}


def per_image_test(values: torch.Tensor, threshold: str | float, rule: Literal["above", "below"] = "above") -> Test:
    """The test of per-image values (n,) (or paired differences) against a threshold (a :data:`THRESHOLDS` name
    or a number): mean, standard error ``sd / √n`` (sample sd; 0 for one image)."""
    v = values.double().flatten()
    n = len(v)
    se = float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    t = THRESHOLDS[threshold] if isinstance(threshold, str) else float(threshold)
    return Test(float(v.mean()) if n else 0.0, se, t, THRESHOLDS["z"], n, rule)


def paired(a: Cell, b: Cell, threshold: str | float, rule: Literal["above", "below"] = "above") -> Test:
    """A − B on the same images through the paired per-image differences (see :mod:`.thresholds`)."""
    if a.final.shape[1] != b.final.shape[1]:
        raise ValueError(f"paired figures on different image counts: {a.final.shape[1]} vs {b.final.shape[1]}")
    return per_image_test(a.per_image - b.per_image, threshold, rule)


class Audit:
    """The audited model (``defense`` if given, else ``target.model``), its images and its attack sets. The
    defence is reached only through :mod:`igd_cli.contract` (IG-Defense from ``mask_path``, or any other).

    Example::

        audit = Audit(target, target.data("test", 16), eps=8 / 255, preset="quick", defense=defense)
        run_audit(audit, checks=[1, 6, 9])["flags"]          # checks=None (the default): every check
    """

    def __init__(self, target: Target, data: ImageSet, *, eps: float, preset: str = "quick",
                 defense: nn.Module | None = None, mask_path: str | Path | None = None,
                 workdir: str | Path | None = None, seed: int = 0, batch_size: int = 128,
                 draws: int = DEFAULT_DRAWS, protocol: str = "draws", show_progress: bool = True,
                 overrides: dict[str, Any] | None = None):
        if preset not in PRESETS:
            raise IgdError(f"--preset {preset}: expected {' or '.join(PRESETS)}")
        unknown = set(overrides or {}) - set(PRESETS[preset])
        if unknown:
            raise ValueError(f"unknown preset keys: {sorted(unknown)}")
        self.target, self.data, self.eps = target, data, float(eps)
        self.preset = {**PRESETS[preset], **(overrides or {})}  # overrides: smaller budgets for tests
        self.preset_name = preset if not overrides else f"{preset} (overridden: {', '.join(sorted(overrides))})"
        self.defense, self.mask_path = defense, mask_path
        self.workdir = Path(workdir) if workdir is not None else None
        self.seed, self.batch_size, self.draws, self.show_progress = int(seed), batch_size, int(draws), show_progress
        check_protocol(protocol, draws, "igd audit")
        self.protocol = protocol  # "single-draw": a randomized model scored once (what check 1 flags)
        self.ident = {} if defense is None else identity_of(defense, mask_path)
        self._evaluators: dict[str, tuple[Evaluator, str]] = {}
        self._bits: dict[str, torch.Tensor] = {}
        self._variants: dict[str, nn.Module | None] = {}
        self._no_gradient: dict[tuple[str, str], str | None] = {}

    # -- models ----------------------------------------------------------------------------------------
    @property
    def audited(self) -> nn.Module:
        return self.defense if self.defense is not None else self.target.model

    @property
    def randomized(self) -> bool:
        return is_randomized(self.audited)

    @property
    def has_defense(self) -> bool:
        return self.defense is not None

    def variant(self, which: Which) -> nn.Module | None:
        """The defence's frozen copy or baseline (:func:`igd_cli.contract.frozen`, ``baseline``), None where the
        defence offers none."""
        if which not in self._variants:
            self._variants[which] = contract.frozen(self.defense) if which == "frozen" else \
                contract.baseline(self.defense, seed=self.seed)
        return self._variants[which]

    def model(self, which: Which) -> nn.Module:
        if which == "audited":
            return self.audited
        if which == "base":
            return self.target.model
        if not self.has_defense:
            raise IgdError(f"the {which} variant needs a defence: give --mask or --defense")
        m = self.variant(which)
        if m is None:
            raise IgdError(f"the {which} variant: this defence offers none")
        return m

    def no_gradient(self, attack: str, which: Which = "audited") -> str | None:
        """Why ``attack`` cannot run against model ``which`` (no gradient to follow), or None."""
        key = (attack, which)
        if key not in self._no_gradient:
            ev, kind = self._evaluator(which, self.eps, self.budgets())
            self._no_gradient[key] = ev.no_gradient(attack, kind)
        return self._no_gradient[key]

    def runnable(self, attacks: Sequence[str], which: Which = "audited") -> list[str]:
        """Those of ``attacks`` that can run against model ``which`` (every black-box one; a gradient one where
        the model has a gradient)."""
        return [a for a in attacks if self.no_gradient(a, which) is None]

    def whitebox(self, which: Which = "audited") -> str:
        """The white-box attack for a model: AutoAttack's rand version (APGD+EoT) if randomized, else APGD-CE."""
        return "apgd-eot" if is_randomized(self.model(which)) else "apgd-ce"

    # -- budgets and sets --------------------------------------------------------------------------------
    def budgets(self, **over: int | None) -> Budgets:
        """The preset's budgets with overrides (None keeps the preset's, which None keeps the paper's)."""
        p = {k: self.preset[k] for k in ("steps", "restarts", "queries", "eot_iter")}
        p.update({k: v for k, v in over.items() if v is not None})
        return Budgets(**p)

    def _evaluator(self, which: Which, eps: float, budgets: Budgets) -> tuple[Evaluator, str]:
        key = json.dumps([which, round(eps, 10), budgets.kwargs()], sort_keys=True)
        if key not in self._evaluators:
            if which == "base" or (which == "audited" and self.defense is None):
                ev, kind = Evaluator(self.target, None, self.data, **self._ev_args(eps, budgets)), "base"
            else:
                meta = dict(self.ident)
                if which != "audited":  # variants' sets are keyed apart from the defence's own
                    meta["variant"] = {"frozen": "frozen-noise-2", "smoothed": "smoothing-alone"}[which]
                    if which == "smoothed" and self.ident.get("defense_fingerprint") is not None:
                        meta["variant"] = "baseline"
                ev = Evaluator(self.target, self.model(which), self.data, defense_meta=meta,
                               **self._ev_args(eps, budgets))
                kind = "defended"
            self._evaluators[key] = (ev, kind)
        return self._evaluators[key]

    def _ev_args(self, eps: float, budgets: Budgets) -> dict[str, Any]:
        return {"eps": eps, "budgets": budgets, "seed": self.seed, "batch_size": self.batch_size,
                "workdir": self.workdir, "show_progress": self.show_progress, "draws": self.draws,
                "protocol": self.protocol}

    def bits(self, attack: str, which: Which = "audited", *, eps_factor: float = 1.0,
             on: Which | None = None, **budget: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean bits, the attack's bits) on model ``on`` (default: ``which``) of ``attack`` run against model
        ``which`` (``on`` ≠ ``which``: a transfer set); each (D, n), see :mod:`igd_cli.scoring`."""
        on = which if on is None else on
        eps = self.eps * eps_factor
        b = self.budgets(**budget)
        key = json.dumps([attack, which, on, round(eps, 10), b.kwargs()], sort_keys=True)
        ev_on, kind_on = self._evaluator(on, eps, b)
        if key not in self._bits:
            ev, kind = self._evaluator(which, eps, b)
            res, _, bits = ev.obtain(attack, kind, ev.positions)
            self._bits[key] = bits if on == which else ev_on.column(res, kind_on)
        return ev_on.clean(kind_on), self._bits[key]

    def robust(self, attacks: Sequence[str], which: Which = "audited", *, on: Which | None = None,
               eps_factor: float = 1.0, **budget: int | None) -> Cell:
        """Robust accuracy of model ``on`` (default ``which``) under the image-wise worst case over ``attacks``
        run against ``which``: per image the candidate (clean or an attack's point) with the lowest mean
        correctness over the selection draws, scored on fresh draws (Croce et al.)."""
        cands: list[torch.Tensor] = []
        for a in attacks:
            clean, bits = self.bits(a, which, on=on, eps_factor=eps_factor, **budget)
            if not cands:
                cands.append(clean)
            cands.append(bits)
        return Cell.of(final_of_selected(cands))

    def iwwc(self, which: Which = "audited") -> Cell:
        """The paper's image-wise worst case on model ``which``: IW-WC's six base-model sets transferred to it and
        its three direct attacks (those that can run), in ``igd defend-eval``'s order (transfer first), scored by
        the protocol."""
        cands = [self.bits(TRANSFER[0], "base", on=which)[0]]
        cands += [self.bits(a, "base", on=which)[1] for a in TRANSFER]
        cands += [self.bits(a, which)[1] for a in self.runnable(DIRECT_RUN_ORDER, which)]
        return Cell.of(final_of_selected(cands))

    def clean(self, which: Which = "audited") -> Cell:
        ev, kind = self._evaluator(which, self.eps, self.budgets())
        return Cell.of(ev.clean_final(kind))

    def adversarial(self, attack: str, which: Which = "audited") -> torch.Tensor:
        """The points of ``attack`` against ``which`` (obtained or reused like every set of the audit)."""
        ev, kind = self._evaluator(which, self.eps, self.budgets())
        res, _, _ = ev.obtain(attack, kind, ev.positions)
        return res.x_adv

    @property
    def x(self) -> torch.Tensor:
        return self._evaluator("base", self.eps, self.budgets())[0].x

    @property
    def y(self) -> torch.Tensor:
        return self._evaluator("base", self.eps, self.budgets())[0].y

    @property
    def keys(self) -> torch.Tensor:
        """The images' identities (:func:`igd_cli.noise.image_keys`), which key the noise of their queries."""
        return self._evaluator("base", self.eps, self.budgets())[0].keys

    @property
    def positions(self) -> torch.Tensor:
        return self._evaluator("base", self.eps, self.budgets())[0].positions
