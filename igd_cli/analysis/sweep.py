"""Sensitivity sweeps (the paper's Figs. 5A-D, 6A-C, 7C and Table 10): clean and robust accuracy of the defended
model, with the base model beside it, as one setting varies — k, the attack's ε, the smoothing σ, the
temperature τ, the noise samples n_s, the masked layer or the attack's steps.

Every point is evaluated with :class:`~igd_cli.analysis.setup.EvalSetup` (randomized defences by repeated draws:
mean ± std) and stored as ``point-<hash>.json`` in the cache folder, keyed by everything that determines it
(model fingerprint, importance file hash, layer, k, τ, σ, n_s, smoothing, attack, ε, budgets, images, seed,
scoring protocol), so extending a sweep with new values computes only the new points, and a point shared by two
sweeps (k = 2 in a k sweep and in a σ sweep at k = 2) is computed once. Attack sets are cached in the workdir.

Example::

    spec = SweepSpec(over="k", values=[1, 2, 4], k=2, sigma=0.1, attack="aa")
    res = run_sweep(setup, spec, {"block3": ("imp.safetensors", imp)}, cache="runs/demo/sweep-cache")
    [(p["value"], p["clean"], p["robust"]) for p in res["points"]]
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import torch

from ..artifacts import file_sha256
from ..console import err_console
from ..defense import DEFAULT_N_SMOOTH, DEFAULT_TAU, IGDefense, check_k, topk_mask
from ..errors import IgdError
from ..evaluate import PYAUTOATTACK_VERSION, Budgets, attack_revisions, column_label
from .setup import EvalSetup, mask_identity, read_json, write_json

Over = Literal["k", "eps", "sigma", "tau", "n-smooth", "layer", "steps"]
OVER: tuple[str, ...] = ("k", "eps", "sigma", "tau", "n-smooth", "layer", "steps")
#: axis label (with units) of each swept setting
AXIS = {"k": "k (neurons kept per class)", "eps": "attack ε (ℓ∞, image range [0, 1])",
        "sigma": "smoothing σ (noise std, image range [0, 1])", "tau": "τ (soft pseudo-label temperature)",
        "n-smooth": "n_s (noise samples per pass 1)", "layer": "masked layer", "steps": "attack steps"}
#: version of a point's JSON: a change to how points are computed bumps it, so old points are not reused
POINT_FORMAT = 2


def parse_value(over: str, text: str | float | int) -> Any:
    """One ``--values`` entry as the swept setting's type (fractions like ``4/255`` for ε and σ)."""
    s = str(text).strip()
    try:
        if over in ("k", "n-smooth", "steps"):
            v: Any = int(s)
            if v < 1:
                raise ValueError
            return v
        if over == "layer":
            if not s:
                raise ValueError
            return s
        v = float(Fraction(s)) if "/" in s else float(s)
    except (ValueError, ZeroDivisionError):
        raise IgdError(f"--values {text!r}: not a valid {over} value") from None
    if over == "eps" and not 0 < v <= 1 or over == "sigma" and v < 0 or over == "tau" and v <= 0:
        raise IgdError(f"--values {text}: out of range for {over}")
    return v


@dataclass(frozen=True)
class SweepSpec:
    """The defended model and attack at every point, and the setting that varies (``over``) with its values."""

    over: str
    values: tuple[Any, ...]
    k: int
    layer: str | None = None  # None: the only layer given
    sigma: float | None = None  # None: ε/2 of the point's ε (eps sweeps keep σ fixed at the default ε's half)
    tau: float = DEFAULT_TAU
    n_smooth: int = DEFAULT_N_SMOOTH
    rs: bool = True
    attack: str = "aa"  # none | an attack name | iw-wc

    def __post_init__(self) -> None:
        if self.over not in OVER:
            raise IgdError(f"--over {self.over}: choose from {', '.join(OVER)}")
        if not self.values:
            raise IgdError("--values: give at least one value")
        if self.over == "steps" and self.attack == "none":
            raise IgdError("--over steps needs an attack (--attack NAME or iw-wc)")

    def at(self, value: Any) -> "SweepSpec":
        """The settings at one point: ``over`` set to ``value``."""
        name = {"n-smooth": "n_smooth"}.get(self.over, self.over)
        return replace(self, **{name: value}) if name in ("k", "sigma", "tau", "n_smooth", "layer") else self


def _point_key(setup: EvalSetup, spec: SweepSpec, layer: str, imp_sha: str, eps: float, sigma: float | None,
               budgets: Budgets) -> dict[str, Any]:
    return json.loads(json.dumps({
        "format": POINT_FORMAT, "model_fingerprint": setup.target.loaded.fingerprint, "importance_sha256": imp_sha,
        "layer": layer, "k": spec.k, "tau": spec.tau, "sigma": sigma, "n_smooth": spec.n_smooth, "rs": spec.rs,
        # a clean-only point depends on neither ε nor the attack budget (σ is in the key): reused across presets
        "attack": spec.attack, "eps": None if spec.attack == "none" else round(eps, 10),
        "norm": None if spec.attack == "none" else setup.target.threat_model,
        "budget": None if spec.attack == "none" else budgets.kwargs(),
        "revisions": None if spec.attack == "none" else attack_revisions(spec.attack),
        "pyautoattack": None if spec.attack == "none" else PYAUTOATTACK_VERSION,
        "data": setup.data.identity(),
        "seed": setup.seed, "protocol": setup.protocol, "draws": setup.draws, **setup.target.identity()},
        sort_keys=True))


def _point_layer(p: SweepSpec, importances: dict[str, tuple[str, torch.Tensor]]) -> str:
    """The layer of a point (the only one given, unless set), checked to have an importance and k ≤ N."""
    layer = p.layer if p.layer is not None else next(iter(importances))
    if layer not in importances:
        raise IgdError(f"--values {layer}: no --importance for layer {layer} (have {', '.join(importances)})")
    check_k(p.k, importances[layer][1].shape[0])
    return layer


def sweep_point(setup: EvalSetup, spec: SweepSpec, value: Any, importances: dict[str, tuple[str, torch.Tensor]],
                cache: Path | None) -> dict[str, Any]:
    """One point (cached): the defended model at ``spec.at(value)``, its clean accuracy (per draw too) and its
    robust accuracy under ``spec.attack``, with the base model's at the same ε and budget."""
    p = spec.at(value)
    layer = _point_layer(p, importances)
    path, imp = importances[layer]
    eps = float(value) if spec.over == "eps" else setup.eps
    budgets = replace(setup.budgets, steps=int(value)) if spec.over == "steps" else setup.budgets
    sigma = (p.sigma if p.sigma is not None else setup.eps / 2) if p.rs else None
    imp_sha = file_sha256(path)
    key = _point_key(setup, p, layer, imp_sha, eps, sigma, budgets)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = None if cache is None else Path(cache) / f"point-{digest}.json"
    if file is not None and file.is_file():
        try:
            stored = read_json(file)
            if stored.get("key") == key:
                return {**stored["point"], "value": value, "cached": True}
        except IgdError:
            pass  # unreadable: recompute and overwrite
    model = setup.target.model
    mask = topk_mask(imp, p.k)
    d = IGDefense(model, layer, mask.to(setup.target.device), tau=p.tau, sigma=sigma, n_smooth=p.n_smooth, rs=p.rs,
                  seed=setup.seed)
    r = setup.evaluate(d, mask_identity(mask, layer, d.settings(), k=p.k), spec.attack, eps=eps, budgets=budgets)
    clean = r["scores"]["defended"]["clean"]
    point: dict[str, Any] = {
        "layer": layer, "k": p.k, "sigma": sigma, "tau": p.tau, "n_smooth": p.n_smooth,
        "eps": key["eps"], "budget": key["budget"], "clean": r["clean_accuracy"], "clean_std": r["clean_accuracy_std"],
        "clean_per_draw": [c / clean["n"] for c in clean["per_draw"]], "base_clean": r["base_clean_accuracy"],
        "draws": r["draws"], "randomized": r["randomized"], "protocol": r["protocol"],
        "robust": None, "robust_std": None, "base_robust": None, "seconds": r["seconds"].get("total")}
    if spec.attack == "iw-wc":
        point.update({"robust": r["worst_case"], "robust_std": r["worst_case_std"],
                      "robust_majority": r["worst_case_majority"], "robust_all_draws": r["worst_case_all_draws"],
                      "base_robust": r["base_worst_case"], "measured_on_survivors": r["measured_on_survivors"]})
    elif spec.attack != "none":
        point.update({"robust": r["robust_accuracy"][spec.attack], "robust_std": r["robust_accuracy_std"][spec.attack],
                      "base_robust": r["base_robust_accuracy"].get(spec.attack)})
    if file is not None:
        write_json(file, {"key": key, "point": point})
    return {**point, "value": value, "cached": False}


def run_sweep(setup: EvalSetup, spec: SweepSpec, importances: dict[str, tuple[str, torch.Tensor]], *,
              cache: str | Path | None) -> dict[str, Any]:
    """Every point of the sweep in the order of ``spec.values`` (cached points are read back, not recomputed)."""
    for v in spec.values:  # every value checked before the first point is computed
        _point_layer(spec.at(v), importances)
    points = []
    for i, v in enumerate(spec.values):
        err_console.print(f"sweep {spec.over} = {v} ({i + 1}/{len(spec.values)})", highlight=False)
        points.append(sweep_point(setup, spec, v, importances, Path(cache) if cache is not None else None))
    return {"analysis": "sweep", "over": spec.over, "values": list(spec.values), "attack": spec.attack,
            "settings": {"k": spec.k, "layer": spec.layer, "sigma": spec.sigma, "tau": spec.tau,
                         "n_smooth": spec.n_smooth, "rs": spec.rs},
            "setup": setup.describe(), "points": points, **setup.target.record(),
            "computed": sum(not p["cached"] for p in points), "reused": sum(p["cached"] for p in points)}


def analyze_sweep(setup: EvalSetup, rankings: dict[str, tuple[str, str, torch.Tensor]], spec: SweepSpec,
                  out: str | Path) -> dict[str, Any]:
    """``igd analyze sweep``: :func:`run_sweep` with one importance per layer, points cached in
    ``OUT/sweep-cache``, written to ``OUT/sweep-<over>-<ranking>.json`` with its curves (``.png``); returns the
    JSON."""
    from ..report import plot_sweep

    t0 = time.perf_counter()

    by_layer: dict[str, tuple[str, torch.Tensor]] = {}
    for path, layer, imp in rankings.values():
        if layer in by_layer:
            raise IgdError(f"--importance: two rankings for layer {layer}; a sweep takes one per layer")
        by_layer[layer] = (path, imp)
    if spec.over != "layer" and len(by_layer) > 1 and spec.layer is None:
        raise IgdError("--importance: several layers given; sweep --over layer, or pass --layer")
    res = run_sweep(setup, spec, by_layer, cache=Path(out) / "sweep-cache")
    stem = Path(out) / f"sweep-{spec.over}-{'+'.join(rankings)}"
    vals = [float(v) for v in spec.values] if spec.over != "layer" else []
    log = bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 8 and spec.over in ("k", "tau", "sigma", "n-smooth", "steps")
    robust = {"none": "clean only", "iw-wc": "IW-WC"}.get(spec.attack) or column_label(spec.attack)
    title = (f"{setup.target.loaded.name.split('/')[-1]} · {robust} · ε = {setup.eps:.4g}"
             f" · {len(setup.data)} images · {setup.protocol}")
    res["plot"] = str(plot_sweep(stem.with_suffix(".png"), res["points"], AXIS[spec.over],
                                 categorical=spec.over == "layer", log=log, robust_label=robust, title=title))
    res["seconds"] = round(time.perf_counter() - t0, 3)
    res["json"] = str(write_json(stem.with_suffix(".json"), res))
    return res
