"""The paper's ablation (Table 6): what each component of IG-Defense brings, row by row.

Rows: (1) one pass, the base model; (2) one pass with randomized smoothing (:class:`igd_cli.variants.SmoothedModel`);
(3) two passes without a mask (IG-Defense with the all-ones mask: ``s = Σ_c ŷ_c = 1``, no smoothing); (4, 5) a
random top-k mask without and with smoothing; then each given ranking's top-k mask without and with smoothing.
Columns: clean, AutoAttack on the row's model, and IW-WC (six transfer sets made once on the base model and
shared by every row, three attacks on the row's model). Rows with smoothing are randomized: every figure is
scored by repeated draws (mean ± std, :mod:`igd_cli.scoring`); the others are exact.

Example::

    rows = run_ablation(setup, "block3", {"lo-ir": imp}, k=2, sigma=0.1)
    [(r.name, r.figures["iw_wc"]) for r in rows]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from ..console import err_console
from ..defense import DEFAULT_N_SMOOTH, DEFAULT_TAU, IGDefense, topk_mask
from ..devices import module_device
from ..errors import IgdError
from ..ranking.random_ir import random_importance
from ..variants import SmoothedModel
from .setup import EvalSetup, mask_identity, write_json

Column = Literal["clean", "aa", "iw_wc"]
COLUMNS: tuple[str, ...] = ("clean", "aa", "iw_wc")
COLUMN_LABELS = {"clean": "Clean", "aa": "AA", "iw_wc": "IW-WC"}


@dataclass
class AblationRow:
    """One row of Table 6: how the model is built and its figures (fractions; ``*_std`` over draws, 0 when
    deterministic), plus the evaluation JSON it came from."""

    name: str
    passes: int
    masking: str  # "none", "random-k" or "<ranking>-k"
    rs: bool
    randomized: bool
    figures: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passes": self.passes, "masking": self.masking, "rs": self.rs,
                "randomized": self.randomized, "figures": dict(self.figures), "details": self.details}


@dataclass
class Variant:
    """A row's model (None: the base model itself) and its identity in attack-set metadata."""

    name: str
    passes: int
    masking: str
    rs: bool
    model: nn.Module | None
    identity: dict[str, Any] | None


def variants(model: nn.Module, layer: str, rankings: dict[str, torch.Tensor], k: int, *, sigma: float,
             tau: float = DEFAULT_TAU, n_smooth: int = DEFAULT_N_SMOOTH, seed: int = 0, random_seed: int = 0
             ) -> list[Variant]:
    """Table 6's rows for ``model`` masked at ``layer``: base, smoothing alone, two passes without a mask, random-k
    and each ranking's top-k without and with smoothing (the random mask is :mod:`igd_cli.ranking.random_ir`'s
    matrix for ``random_seed``, the ablation baseline of ``igd rank --method random``)."""
    n, c = next(iter(rankings.values())).shape
    out = [Variant("one pass (base model)", 1, "none", False, None, None)]
    smooth = SmoothedModel(model, sigma, seed=seed)
    out.append(Variant("one pass + RS", 1, "none", True, smooth,
                       mask_identity(None, None, {"sigma": sigma, "rs": True}, variant="smoothing-alone")))

    def defended(name: str, masking: str, mask: torch.Tensor, rs: bool) -> Variant:
        d = IGDefense(model, layer, mask.to(module_device(model)), tau=tau,
                      sigma=sigma if rs else None, n_smooth=n_smooth, rs=rs, seed=seed)
        return Variant(name, 2, masking, rs, d, mask_identity(mask, layer, d.settings(), variant=masking))

    out.append(defended("two passes, no mask", "none", torch.ones(n, c), False))
    masks = {f"random-{k}": topk_mask(random_importance(n, c, random_seed), k)}
    masks.update({f"{name}-{k}": topk_mask(imp, k) for name, imp in rankings.items()})
    for masking, mask in masks.items():
        out.append(defended(f"two passes, {masking}", masking, mask, False))
        out.append(defended(f"two passes, {masking} + RS", masking, mask, True))
    return out


def evaluate_row(setup: EvalSetup, v: Variant, base_json: dict[str, Any] | None = None,
                 iw_wc: bool = True) -> AblationRow:
    """A row's clean, AA and IW-WC figures. AutoAttack runs on all images first; IW-WC then reuses that set for
    its AA column (same key in the workdir) and runs RayS and APGD+EoT only where they can still change the
    worst case. The base row reads the base side of ``base_json`` (any evaluation made with ``setup``)."""
    if v.model is None:
        assert base_json is not None
        fig = {"clean": base_json["base_clean_accuracy"], "clean_std": 0.0,
               "aa": base_json["base_robust_accuracy"].get("aa"), "aa_std": 0.0,
               "iw_wc": base_json.get("base_worst_case"), "iw_wc_std": 0.0,
               "iw_wc_paper": base_json.get("base_worst_case"), "iw_wc_paper_std": 0.0}
        return AblationRow(v.name, v.passes, v.masking, v.rs, False, fig, {"draws": 1})
    aa = setup.evaluate(v.model, v.identity, "aa")
    fig: dict[str, float | None] = {"clean": aa["clean_accuracy"], "clean_std": aa["clean_accuracy_std"],
                                    "aa": aa["robust_accuracy"]["aa"], "aa_std": aa["robust_accuracy_std"]["aa"],
                                    "iw_wc": None, "iw_wc_std": None}
    details: dict[str, Any] = {"draws": aa["draws"], "protocol": aa["protocol"], "aa": _brief(aa)}
    if iw_wc:
        iw = setup.evaluate(v.model, v.identity, "iw-wc")
        fig.update({"iw_wc": iw["worst_case"], "iw_wc_std": iw["worst_case_std"],
                    "iw_wc_majority": iw["worst_case_majority"], "iw_wc_all_draws": iw["worst_case_all_draws"],
                    # the paper's nine columns (an IG-Defense row adds the adaptive attack to iw_wc)
                    "iw_wc_paper": iw.get("iw_wc_paper", iw["worst_case"]),
                    "iw_wc_paper_std": iw.get("iw_wc_paper_std", iw["worst_case_std"])})
        details["iw_wc"] = _brief(iw)
    return AblationRow(v.name, v.passes, v.masking, v.rs, bool(aa["randomized"]) and int(aa["draws"]) > 1, fig, details)


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    """What a row keeps of an evaluation: its figures per column and the scores, not the per-class tables."""
    return {k: r[k] for k in ("n_examples", "clean_accuracy", "clean_accuracy_std", "robust_accuracy",
                              "robust_accuracy_std", "base_robust_accuracy", "worst_case", "worst_case_std",
                              "base_worst_case", "iw_wc_paper", "iw_wc_paper_std", "beyond_paper",
                              "measured_on_survivors", "draws", "protocol", "sets", "seconds")
            if k in r}


def run_ablation(setup: EvalSetup, layer: str, rankings: dict[str, torch.Tensor], k: int, *, sigma: float,
                 tau: float = DEFAULT_TAU, n_smooth: int = DEFAULT_N_SMOOTH, random_seed: int = 0,
                 iw_wc: bool = True, on_row: Callable[[AblationRow], None] | None = None) -> list[AblationRow]:
    """Every row of :func:`variants`, evaluated with :func:`evaluate_row` in order (the base model's sets first,
    so the transfer sets exist before the first defended row)."""
    vs = variants(setup.target.model, layer, rankings, k, sigma=sigma, tau=tau, n_smooth=n_smooth,
                  seed=setup.seed, random_seed=random_seed)
    err_console.print(f"ablation: {len(vs)} rows on {len(setup.data)} images", highlight=False)
    base_json = setup.evaluate(None, None, "iw-wc" if iw_wc else "aa")
    rows = []
    for v in vs:
        row = evaluate_row(setup, v, base_json, iw_wc=iw_wc)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def analyze_ablation(setup: EvalSetup, rankings: dict[str, tuple[str, str, torch.Tensor]], k: int, out: str | Path,
                     *, sigma: float | None = None, tau: float = DEFAULT_TAU, n_smooth: int = DEFAULT_N_SMOOTH,
                     random_seed: int = 0, iw_wc: bool = True) -> dict[str, Any]:
    """``igd analyze ablation``: :func:`run_ablation` for the given rankings (all of one layer; σ default ε/2),
    written to ``OUT/ablation-<layer>-k<k>.json`` with its bar chart (``.png``); returns the JSON."""
    from ..report import plot_ablation

    t0 = time.perf_counter()

    layers = {layer for _, layer, _ in rankings.values()}
    if len(layers) != 1:
        raise IgdError(f"--importance: the rankings of an ablation must share one layer, got {', '.join(sorted(layers))}")
    layer = layers.pop()
    sigma = setup.eps / 2 if sigma is None else sigma
    rows = run_ablation(setup, layer, {n: imp for n, (_, _, imp) in rankings.items()}, k, sigma=sigma, tau=tau,
                        n_smooth=n_smooth, random_seed=random_seed, iw_wc=iw_wc)
    stem = Path(out) / f"ablation-{layer.replace('.', '-')}-k{k}"
    result = {"analysis": "ablation", "layer": layer, "k": k, "rankings": {n: p for n, (p, _, _) in rankings.items()},
              "settings": {"sigma": sigma, "tau": tau, "n_smooth": n_smooth, "random_seed": random_seed},
              "columns": [c for c in COLUMNS if iw_wc or c != "iw_wc"], "column_labels": COLUMN_LABELS,
              "rows": [r.to_json() for r in rows], "setup": setup.describe(), **setup.target.record()}
    title = (f"{setup.target.loaded.name.split('/')[-1]} · {layer} · k = {k} · σ = {sigma:.4g} · ε = {setup.eps:.4g}"
             f" · {len(setup.data)} images")
    result["plot"] = str(plot_ablation(stem.with_suffix(".png"), result["rows"], result["columns"], COLUMN_LABELS,
                                       title))
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["json"] = str(write_json(stem.with_suffix(".json"), result))
    return result
