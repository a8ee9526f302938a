"""Checks on attack strength, all on the audited model: black-box vs white-box (check 2, Table 9), stronger
AutoAttack (check 3, Table 9), more steps (check 4, Fig. 7C) and larger budgets (check 5, Table 10). Every
robust accuracy of a randomized model is the repeated-draw score (mean ± std over draws).

Example::

    for check in (blackbox_vs_whitebox, stronger_autoattack, attack_steps, attack_budget):
        print(check(audit).summary)
"""

from __future__ import annotations

from ..scoring import Score, final_of_selected
from .context import Audit, Cell, margin
from .result import CheckResult
from .thresholds import THRESHOLDS

BLACKBOX = ("square", "rays")


def _cells(cells: dict[str, Cell]) -> dict[str, dict]:
    return {k: c.to_json() for k, c in cells.items()}


def blackbox_vs_whitebox(audit: Audit) -> CheckResult:
    """Check 2: Square and RayS (black box) must not beat the white-box attacks by more than a small margin."""
    white_names = [audit.whitebox()] + ([] if audit.randomized else ["apgd-t-dlr"])
    white = audit.robust(white_names)
    black = {a: audit.robust([a]) for a in BLACKBOX}
    worst_name = min(black, key=lambda a: black[a].mean)
    m = margin("blackbox_margin", white, black[worst_name])
    bad = white.mean - black[worst_name].mean > m
    text = (f"white box ({' + '.join(white_names)}) {white.text()}; "
            + "; ".join(f"{a} {c.text()}" for a, c in black.items()))
    meaning = (f"{worst_name} (no gradients) beats the white-box attacks by {100 * (white.mean - black[worst_name].mean):.1f} "
               "points: the gradients mislead the attacker (masked gradients)") if bad else \
        "the white-box attacks are at least as strong as the black-box ones: gradients are useful"
    figures = {"whitebox_attacks": white_names, "whitebox": white.to_json(), "blackbox": _cells(black),
               "margin": m}
    return CheckResult(2, "black box vs white box", "flag" if bad else "ok", figures, text, meaning)


def stronger_autoattack(audit: Audit) -> CheckResult:
    """Check 3: the paper's stronger AutoAttack (APGD 200 steps × 10 restarts, FAB-T 10 restarts, Square 5
    restarts; scaled down by the quick preset) must not fall far below standard AutoAttack."""
    st = audit.preset["stronger"]
    standard = audit.robust(["aa"])
    parts = {
        audit.whitebox(): audit.robust([audit.whitebox()], steps=st["steps"], restarts=st["restarts"]),
        "fab-t": audit.robust(["fab-t"], restarts=st["fab_restarts"]),
        "square": audit.robust(["square"], restarts=st["square_restarts"]),
    }
    # the stronger AutoAttack's image-wise worst case: standard AA and the three stronger attacks
    clean, aa = audit.bits("aa")
    cands = [clean, aa, audit.bits(audit.whitebox(), steps=st["steps"], restarts=st["restarts"])[1],
             audit.bits("fab-t", restarts=st["fab_restarts"])[1],
             audit.bits("square", restarts=st["square_restarts"])[1]]
    stronger = Cell(Score.of(final_of_selected(cands)))
    m = margin("stronger_aa_drop", standard, stronger)
    bad = standard.mean - stronger.mean > m
    text = (f"AA {standard.text()}; stronger AA {stronger.text()} ({audit.whitebox()} {st['steps'] or 'paper'} steps × "
            f"{st['restarts']} restarts, FAB-T × {st['fab_restarts']}, Square × {st['square_restarts']})")
    meaning = (f"more restarts and steps remove {100 * (standard.mean - stronger.mean):.1f} more points: standard "
               "AutoAttack overestimates the robustness") if bad else \
        "more restarts and steps change little: standard AutoAttack's figure holds"
    figures = {"aa": standard.to_json(), "stronger_aa": stronger.to_json(), "parts": _cells(parts),
               "budgets": dict(st), "margin": m}
    return CheckResult(3, "stronger AutoAttack", "flag" if bad else "ok", figures, text, meaning)


def attack_steps(audit: Audit) -> CheckResult:
    """Check 4 (Fig. 7C): FGSM and the white-box attack with more and more steps; robust accuracy must not
    rise with more steps."""
    wb = audit.whitebox()
    curve: list[tuple[str, int, Cell]] = [("fgsm", 1, audit.robust(["fgsm"]))]
    for s in audit.preset["steps_curve"]:
        curve.append((f"{wb}-{s}", int(s), audit.robust([wb], steps=int(s), restarts=1)))
    rises = [(curve[i][0], curve[i + 1][0], curve[i + 1][2].mean - curve[i][2].mean) for i in range(len(curve) - 1)
             if curve[i + 1][2].mean - curve[i][2].mean > margin("steps_rise", curve[i][2], curve[i + 1][2])]
    text = " → ".join(f"{name} {c.text()}" for name, _, c in curve)
    meaning = ("robust accuracy rises with more steps (" + ", ".join(f"{a} → {b}: +{100 * d:.1f}" for a, b, d in rises)
               + " points): the iterations get lost, a sign of masked or noisy gradients") if rises else \
        "more steps never help the model: the attack converges as on an honest model"
    figures = {"curve": [{"attack": n, "steps": s, **c.to_json()} for n, s, c in curve],
               "rises": [{"from": a, "to": b, "rise": d} for a, b, d in rises]}
    return CheckResult(4, "attack steps (Fig. 7C)", "flag" if rises else "ok", figures, text, meaning)


def attack_budget(audit: Audit) -> CheckResult:
    """Check 5 (Table 10): AutoAttack at ε, 2ε, 4ε: robust accuracy must fall and be near zero at the largest."""
    factors = list(audit.preset["budget_factors"])
    curve = [(f, audit.robust(["aa"], eps_factor=float(f))) for f in factors]
    rises = [(curve[i][0], curve[i + 1][0], curve[i + 1][1].mean - curve[i][1].mean) for i in range(len(curve) - 1)
             if curve[i + 1][1].mean - curve[i][1].mean > margin("budget_rise", curve[i][1], curve[i + 1][1])]
    last = curve[-1][1]
    high = last.mean > THRESHOLDS["budget_near_zero"]
    text = " → ".join(f"{f}ε={f * audit.eps:.4g}: {c.text()}" for f, c in curve)
    problems = []
    if rises:
        problems.append("accuracy rises with the budget")
    if high:
        problems.append(f"{100 * last.mean:.1f} % survive {factors[-1]}ε (an attack with that budget must win)")
    meaning = ("; ".join(problems) + ": the attack cannot use its budget, a sign of masked gradients") if problems \
        else "larger budgets break the model, down to near zero: the attack uses its budget"
    figures = {"curve": [{"factor": f, "eps": f * audit.eps, **c.to_json()} for f, c in curve],
               "rises": [{"from": a, "to": b, "rise": d} for a, b, d in rises],
               "near_zero": THRESHOLDS["budget_near_zero"]}
    return CheckResult(5, "budget (Table 10)", "flag" if problems else "ok", figures, text, meaning)
