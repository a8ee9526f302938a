"""``igd audit``: is this robustness real? The gradient-masking and randomness checklist (Croce et al., ICML
2022; the paper's Appendix C.2), run on a model and its defence and judged against documented thresholds
(:data:`THRESHOLDS`). Each check gives figures, a one-line summary and a verdict (ok / flag / n/a); flags are
findings, not errors.

Example::

    target = open_target("demo", None, None)
    audit = Audit(target, target.data("test", 100), eps=0.2, preset="quick",
                  defense=load_defense(target, "mask.safetensors"), mask_path="mask.safetensors")
    report = run_audit(audit, checks=[1, 2, 6], plot_dir="plots")
    print([c["verdict"] for c in report["checks"]])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import IgdError
from ..numerics import describe
from ..scoring import rows_for
from .adaptive import CHECK_ID, NAME, adaptive_check
from .context import Audit, Cell
from .defence import frozen_noise_check, mask_acts, smoothing_alone, transfer_vs_direct
from .gradients import autoattack_flags, loss_surfaces, surface_check
from .plots import plot_curve, plot_surfaces
from .result import CheckResult
from .strength import attack_budget, attack_steps, blackbox_vs_whitebox, stronger_autoattack
from .thresholds import PRESETS, THRESHOLDS

#: check number -> (name, function); checks 7-11 need a defence (``n/a`` without a mask)
CHECKS: dict[int, tuple[str, Callable[[Audit], Any]]] = {
    1: ("AutoAttack flags", autoattack_flags),
    2: ("black box vs white box", blackbox_vs_whitebox),
    3: ("stronger AutoAttack", stronger_autoattack),
    4: ("attack steps", attack_steps),
    5: ("budget", attack_budget),
    6: ("loss surface", surface_check),
    7: ("transfer vs direct", transfer_vs_direct),
    8: ("frozen noise", frozen_noise_check),
    9: ("does the mask act?", mask_acts),
    10: ("smoothing alone", smoothing_alone),
    CHECK_ID: (NAME, adaptive_check),  # 11: beyond the paper (docs/adaptive.md)
}


def parse_checks(text: str | None) -> list[int]:
    """``"1,2,6"`` -> [1, 2, 6] (None: every check); a one-line error for anything else."""
    if text is None or not text.strip():
        return list(CHECKS)
    out = []
    for part in text.split(","):
        try:
            c = int(part.strip())
        except ValueError:
            raise IgdError(f"--checks {text}: expected check numbers like 1,2,6 (1..{len(CHECKS)})") from None
        if c not in CHECKS:
            raise IgdError(f"--checks {text}: no check {c} (the checks are 1..{len(CHECKS)})")
        if c not in out:
            out.append(c)
    return sorted(out)


def run_audit(audit: Audit, checks: Sequence[int] | None = None, plot_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the ``checks`` (default all) and return the audit's JSON: every check's figures and verdict, the
    thresholds, the scoring protocol and the plots written to ``plot_dir``.

    Example::

        report = run_audit(Audit(target, images, eps=8 / 255, defense=defense), checks=[6, 9])
        report["flags"], [(c["id"], c["verdict"]) for c in report["checks"]]
    """
    t0 = time.perf_counter()
    results: list[CheckResult] = []
    plots: dict[str, str] = {}
    pdir = Path(plot_dir) if plot_dir is not None else None
    if pdir is not None:
        if pdir.exists() and not pdir.is_dir():
            raise IgdError(f"--plot-dir {pdir}: exists and is not a directory")
        pdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    for c in (checks or list(CHECKS)):
        t = time.perf_counter()
        out = CHECKS[c][1](audit)
        res = out[0] if isinstance(out, tuple) else out
        if pdir is not None and c == 6 and out[1]:
            plots["surface"] = str(plot_surfaces(pdir / "surface.png", out[1], audit.eps))
        if pdir is not None and c == 4:
            pts = [{**p, "label": p["attack"]} for p in res.figures["curve"]]
            plots["steps"] = str(plot_curve(pdir / "steps.png", pts, x="steps", xlabel="attack steps (FGSM: 1)",
                                            title="robust accuracy vs attack steps (Fig. 7C)", log_x=True))
        if pdir is not None and c == 5:
            pts = [{**p, "label": f"{p['factor']}ε"} for p in res.figures["curve"]]
            plots["budget"] = str(plot_curve(pdir / "budget.png", pts, x="eps", xlabel="ε (ℓ∞)",
                                             title="AutoAttack robust accuracy vs budget (Table 10)"))
        results.append(res)
        seconds[str(c)] = round(time.perf_counter() - t, 3)
    rows = rows_for(audit.audited, audit.protocol, audit.draws)
    return {
        "model": audit.target.loaded.name, "model_fingerprint": audit.target.loaded.fingerprint,
        "mask": str(audit.mask_path) if audit.mask_path is not None else None,
        "defense_spec": audit.ident.get("defense"),
        "defense": audit.ident.get("settings") if audit.has_defense else None,
        "dataset": audit.data.name, "split": audit.data.split, "n_examples": len(audit.data), "eps": audit.eps,
        "preset": audit.preset_name, "budgets": audit.budgets().kwargs(), "seed": audit.seed,
        "randomized": audit.randomized, "draws": rows // 2 if rows > 1 else 1,
        "protocol": ("draws" if rows > 1 else audit.protocol if audit.randomized else "deterministic"),
        "checks": [r.to_json() for r in results],
        "flags": [r.id for r in results if r.verdict == "flag"],
        "thresholds": dict(THRESHOLDS), "plots": plots,
        "workdir": str(audit.workdir) if audit.workdir is not None else None,
        "seconds": {**seconds, "total": round(time.perf_counter() - t0, 3)},
        **audit.target.record(),
    }


def render_audit(r: dict[str, Any], console=None) -> None:
    """The audit table: check, figures, verdict (and what a flag means), with the scoring protocol as caption."""
    from rich.table import Table

    from ..console import out_console

    console = console or out_console
    proto = (f"randomized model: every robust accuracy is the repeated-draw score (Croce et al.): per image the "
             f"point with the lowest mean correctness over {r['draws']} draws, scored on {r['draws']} fresh draws, "
             "mean ± std over draws") if r["protocol"] == "draws" else \
        ("randomized model scored by ONE draw per point (single-draw protocol)" if r["randomized"] else
         "deterministic model: every point scored once (exact)")
    proto += ("; comparisons: paired per-image differences, flagged beyond "
              f"{r['thresholds']['z']:g} standard errors (docs/audit.md); numerics: {describe(r.get('numerics'))}")
    defended = r["mask"] or r.get("defense_spec")
    t = Table(title=f"igd audit: {r['model']}" + (f" + {defended}" if defended else "") +
                    f", {r['n_examples']} images of {r['dataset']} ({r['split']}), ε = {r['eps']:.4g}, "
                    f"{r['preset']} preset", caption=proto, caption_justify="left", show_lines=True)
    t.add_column("#", justify="right")
    t.add_column("check")
    t.add_column("figures")
    t.add_column("verdict", justify="center")
    style = {"ok": "[green]ok[/]", "flag": "[bold red]flag[/]", "n/a": "[dim]n/a[/]"}
    for c in r["checks"]:
        fig = c["summary"] + (f"\n[italic]{c['meaning']}[/]" if c["verdict"] == "flag" else "")
        t.add_row(str(c["id"]), c["name"], fig, style[c["verdict"]])
    console.print(t)
    if r["plots"]:
        console.print("plots: " + ", ".join(f"{k} -> {v}" for k, v in r["plots"].items()))


__all__ = ["Audit", "CHECKS", "Cell", "CheckResult", "PRESETS", "THRESHOLDS", "loss_surfaces", "parse_checks",
           "render_audit", "run_audit"]
