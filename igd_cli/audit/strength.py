"""Checks on attack strength, all on the audited model: black-box vs white-box (check 2, Table 9), stronger
AutoAttack (check 3, Table 9), more steps (check 4, Fig. 7C) and larger budgets (check 5, Table 10). Every
robust accuracy of a randomized model is the repeated-draw score (mean ± std over draws); every comparison is a
paired per-image test (:mod:`.thresholds`).

Example::

    for check in (blackbox_vs_whitebox, stronger_autoattack, attack_steps, attack_budget):
        print(check(audit).summary)
"""

from __future__ import annotations

from ..scoring import final_of_selected
from .context import Audit, Cell, paired, per_image_test
from .result import CheckResult

BLACKBOX = ("square", "rays")
#: standard AutoAttack's targeted APGD (APGD-T, DLR loss): the stronger AutoAttack strengthens it like every APGD
APGD_T = "apgd-t-dlr"


def _cells(cells: dict[str, Cell]) -> dict[str, dict]:
    return {k: c.to_json() for k, c in cells.items()}


def _no_gradient(cid: int, name: str) -> CheckResult:
    """A check of gradient attacks on a model without a gradient (check 2 flags it)."""
    return CheckResult(cid, name, "n/a", {"no_gradient": True},
                       "its gradient attacks cannot run: the model's output has no gradient (check 2)", "")


def blackbox_vs_whitebox(audit: Audit) -> CheckResult:
    """Check 2: Square and RayS (black box) must not beat the white-box attacks by more than a small margin."""
    white_names = audit.runnable([audit.whitebox()] + ([] if audit.randomized else ["apgd-t-dlr"]))
    black = {a: audit.robust([a]) for a in BLACKBOX}
    if not white_names:  # no gradient at all: the extreme case of what this check looks for
        text = "no white-box attack can run (the model's output has no gradient); " + \
            "; ".join(f"{a} {c.text()}" for a, c in black.items())
        return CheckResult(2, "black box vs white box", "flag", {"whitebox_attacks": [], "no_gradient": True,
                                                                 "blackbox": _cells(black)}, text,
                           "the gradient attacks get no gradient at all: only black-box, transferred and BPDA "
                           "attacks measure this model, and its white-box figures would be vacuous")
    white = audit.robust(white_names)
    tests = {a: paired(white, c, "blackbox_margin") for a, c in black.items()}
    worst_name = max(tests, key=lambda a: tests[a].estimate)
    test = tests[worst_name]
    bad = any(t.flag for t in tests.values())
    text = (f"white box ({' + '.join(white_names)}) {white.text()}; "
            + "; ".join(f"{a} {c.text()}" for a, c in black.items())
            + f"; white − {worst_name} {test.text()}")
    meaning = (f"{worst_name} (no gradients) beats the white-box attacks by {test.text()}: the gradients mislead "
               "the attacker (masked gradients)") if bad else \
        "the black-box attacks are not shown to beat the white-box ones: gradients are useful"
    figures = {"whitebox_attacks": white_names, "whitebox": white.to_json(), "blackbox": _cells(black),
               "tests": {a: t.to_json() for a, t in tests.items()}}
    return CheckResult(2, "black box vs white box", "flag" if bad else "ok", figures, text, meaning)


def stronger_autoattack(audit: Audit) -> CheckResult:
    """Check 3: the paper's stronger AutoAttack (every APGD — the white-box one and APGD-T — 200 steps × 10
    restarts, FAB-T 10 restarts, Square 5 restarts; scaled down by the quick preset) must not fall far below
    standard AutoAttack."""
    st = audit.preset["stronger"]
    wb = audit.whitebox()
    if audit.no_gradient(wb) is not None:
        return _no_gradient(3, "stronger AutoAttack")
    apgd = {"steps": st["steps"], "restarts": st["restarts"]}
    runs = {wb: apgd, APGD_T: apgd, "fab-t": {"restarts": st["fab_restarts"]},
            "square": {"restarts": st["square_restarts"]}}
    standard = audit.robust(["aa"])
    parts = {a: audit.robust([a], **b) for a, b in runs.items()}
    # the stronger AutoAttack's image-wise worst case: standard AA and the four stronger attacks
    clean, aa = audit.bits("aa")
    stronger = Cell.of(final_of_selected([clean, aa] + [audit.bits(a, **b)[1] for a, b in runs.items()]))
    test = paired(standard, stronger, "stronger_aa_drop")
    bad = test.flag
    text = (f"AA {standard.text()}; stronger AA {stronger.text()} ({wb} and {APGD_T} {st['steps'] or 'paper'} "
            f"steps × {st['restarts']} restarts, FAB-T × {st['fab_restarts']}, Square × {st['square_restarts']}); "
            f"drop {test.text()}")
    meaning = (f"more restarts and steps remove {test.text()}: standard AutoAttack overestimates the "
               "robustness") if bad else \
        "more restarts and steps are not shown to remove more than the margin: standard AutoAttack's figure holds"
    figures = {"aa": standard.to_json(), "stronger_aa": stronger.to_json(), "parts": _cells(parts),
               "budgets": dict(st), "test": test.to_json()}
    return CheckResult(3, "stronger AutoAttack", "flag" if bad else "ok", figures, text, meaning)


def attack_steps(audit: Audit) -> CheckResult:
    """Check 4 (Fig. 7C): FGSM and the white-box attack with more and more steps; robust accuracy must not
    rise with more steps."""
    wb = audit.whitebox()
    if audit.no_gradient(wb) is not None:
        return _no_gradient(4, "attack steps (Fig. 7C)")
    curve: list[tuple[str, int, Cell]] = [("fgsm", 1, audit.robust(["fgsm"]))]
    for s in audit.preset["steps_curve"]:
        curve.append((f"{wb}-{s}", int(s), audit.robust([wb], steps=int(s), restarts=1)))
    tests = [(curve[i][0], curve[i + 1][0], paired(curve[i + 1][2], curve[i][2], "steps_rise"))
             for i in range(len(curve) - 1)]
    rises = [(a, b, t) for a, b, t in tests if t.flag]
    text = " → ".join(f"{name} {c.text()}" for name, _, c in curve)
    meaning = ("robust accuracy rises with more steps (" + ", ".join(f"{a} → {b}: {t.text()}" for a, b, t in rises)
               + "): the iterations get lost, a sign of masked or noisy gradients") if rises else \
        "more steps are not shown to help the model: the attack converges as on an honest model"
    figures = {"curve": [{"attack": n, "steps": s, **c.to_json()} for n, s, c in curve],
               "tests": [{"from": a, "to": b, **t.to_json()} for a, b, t in tests],
               "rises": [{"from": a, "to": b, "rise": t.estimate} for a, b, t in rises]}
    return CheckResult(4, "attack steps (Fig. 7C)", "flag" if rises else "ok", figures, text, meaning)


def attack_budget(audit: Audit) -> CheckResult:
    """Check 5 (Table 10): AutoAttack at ε, 2ε, 4ε: robust accuracy must fall and be near zero at the largest."""
    if audit.no_gradient("aa") is not None:
        return _no_gradient(5, "budget (Table 10)")
    factors = list(audit.preset["budget_factors"])
    curve = [(f, audit.robust(["aa"], eps_factor=float(f))) for f in factors]
    tests = [(curve[i][0], curve[i + 1][0], paired(curve[i + 1][1], curve[i][1], "budget_rise"))
             for i in range(len(curve) - 1)]
    rises = [(a, b, t) for a, b, t in tests if t.flag]
    last = curve[-1][1]
    near = per_image_test(last.per_image, "budget_near_zero")
    high = near.flag
    text = " → ".join(f"{f}ε={f * audit.eps:.4g}: {c.text()}" for f, c in curve)
    problems = []
    if rises:
        problems.append("accuracy rises with the budget (" + ", ".join(f"{a}ε → {b}ε: {t.text()}"
                                                                       for a, b, t in rises) + ")")
    if high:
        problems.append(f"{100 * last.mean:.1f} ± {100 * near.se:.1f} % survive {factors[-1]}ε (an attack with "
                        "that budget must win)")
    meaning = ("; ".join(problems) + ": the attack cannot use its budget, a sign of masked gradients") if problems \
        else "larger budgets break the model, down to near zero: the attack uses its budget"
    figures = {"curve": [{"factor": f, "eps": f * audit.eps, **c.to_json()} for f, c in curve],
               "tests": [{"from": a, "to": b, **t.to_json()} for a, b, t in tests],
               "rises": [{"from": a, "to": b, "rise": t.estimate} for a, b, t in rises],
               "near_zero": near.to_json()}
    return CheckResult(5, "budget (Table 10)", "flag" if problems else "ok", figures, text, meaning)
