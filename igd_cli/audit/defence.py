"""Checks that need a defence (``--mask`` or ``--defense``): transfer vs direct attacks (check 7), frozen noise
(check 8), does the mask act (check 9) and smoothing alone (check 10). Without a defence they report ``n/a``;
checks 8-10 use the defence's optional capabilities (:mod:`igd_cli.contract`: ``frozen``,
``changes_prediction``, ``baseline``), and are ``n/a`` for a defence without them.

The direct attacks are IW-WC's (AutoAttack, RayS, APGD+EoT on the defended model; a gradient attack only where
the defence has a gradient); the transfer sets are IW-WC's sets made on the base model, reused from the work
folder when ``igd pipeline``/``defend-eval`` made them.

Example::

    print(mask_acts(audit).figures["clean"]["mean"])   # share of images where the mask changes the prediction
"""

from __future__ import annotations

import torch

from .. import contract, noise
from ..devices import module_device
from ..evaluate import DIRECT, TRANSFER
from ..scoring import rows_for
from .context import Audit, paired, per_image_test
from .result import CheckResult
from .thresholds import THRESHOLDS


def _na(cid: int, name: str, why: str = "needs a defence: give --mask or --defense") -> CheckResult:
    return CheckResult(cid, name, "n/a", {}, why, "")


def _no_gradient_note(audit: Audit, attacks) -> str:
    """``; no gradient for aa, apgd-eot`` (the direct attacks left out), or nothing."""
    left = [a for a in attacks if audit.no_gradient(a) is not None]
    return f"; {', '.join(left)} could not run (the defence has no gradient)" if left else ""


def transfer_vs_direct(audit: Audit) -> CheckResult:
    """Check 7: the direct attacks on the defence must not be much weaker than the same attacks made on the base
    model and transferred (Croce et al.'s central finding for test-time defences)."""
    if not audit.has_defense:
        return _na(7, "transfer vs direct")
    runs = audit.runnable(DIRECT)  # a gradient attack on a defence without a gradient is left out (weaker: flagged)
    direct = {a: audit.robust([a]) for a in runs}
    transfer = {a: audit.robust([a], "base", on="audited") for a in DIRECT}
    d_all, t_all = audit.robust(runs), audit.robust(list(DIRECT), "base", on="audited")
    test = paired(d_all, t_all, "transfer_margin")
    bad = test.flag
    per_attack = {a: paired(direct[a], transfer[a], "transfer_margin") for a in runs}
    weaker = [a for a, t in per_attack.items() if t.flag]
    text = (f"direct {d_all.text()} vs transferred {t_all.text()} (worst over {', '.join(DIRECT)}; "
            f"difference {test.text()}); "
            + "; ".join(f"{a} {direct[a].text() if a in direct else 'no gradient'} / Tr {transfer[a].text()}"
                        for a in DIRECT) + _no_gradient_note(audit, DIRECT))
    meaning = ("the attacks on the defence do worse than the same attacks on the base model transferred: the "
               "defence hides its gradients from its own attacker, so its direct figures overstate it; only the "
               "worst case over direct and transfer attacks (IW-WC) is a fair figure") if bad else \
        "direct attacks are not shown to be weaker than transferred ones: the defence does not hide its gradients"
    figures = {"direct": {a: c.to_json() for a, c in direct.items()},
               "transfer": {a: c.to_json() for a, c in transfer.items()},
               "direct_worst": d_all.to_json(), "transfer_worst": t_all.to_json(), "weaker_direct": weaker,
               "no_gradient": [a for a in DIRECT if a not in runs],
               "test": test.to_json(), "tests": {a: t.to_json() for a, t in per_attack.items()}}
    return CheckResult(7, "transfer vs direct", "flag" if bad else "ok", figures, text, meaning)


def frozen_noise_check(audit: Audit) -> CheckResult:
    """Check 8: the direct attacks against the defence with its smoothing noise frozen to one draw (one
    deterministic function for the attacker and the scorer, scored once) beside the randomized defence's figure
    (repeated draws)."""
    if not audit.has_defense:
        return _na(8, "frozen noise")
    runs = audit.runnable(DIRECT)
    rand = audit.robust(runs)
    if not audit.randomized:
        return CheckResult(8, "frozen noise", "ok", {"randomized": rand.to_json()},
                           f"defence deterministic (no fresh randomness): {rand.text()}",
                           "no fresh noise to freeze: every figure already comes without randomness")
    if audit.variant("frozen") is None:
        return _na(8, "frozen noise", "the defence cannot be frozen to one draw (it offers no frozen(seed))")
    frozen = audit.robust(audit.runnable(runs, "frozen"), "frozen")
    test = paired(rand, frozen, "frozen_gain")
    bad = test.flag
    text = (f"fresh noise {rand.text()} vs frozen noise {frozen.text()} (worst over {', '.join(runs)}; "
            f"gain {test.text()})")
    meaning = (f"{test.text()} of the robustness exist only with fresh noise: they come from randomness "
               "(attacks aiming at a moving target), not from the interpretability mask") if bad else \
        "the defence is not shown to be more robust with fresh noise than frozen: its robustness does not rest " \
        "on fresh randomness"
    return CheckResult(8, "frozen noise", "flag" if bad else "ok",
                       {"randomized": rand.to_json(), "frozen": frozen.to_json(), "gain": test.estimate,
                        "test": test.to_json()}, text, meaning)


@torch.no_grad()
def mask_change_share(defense, x: torch.Tensor, y: torch.Tensor, rows: int, *, keys: torch.Tensor,
                      seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Per draw (rows, n): does the defence's mechanism change the prediction (IG-Defense: the defended
    prediction against argmax ŷ, the soft pseudo-label of the same query; ``contract.changes_prediction``)?
    Draw r is the r-th query of each image (identities ``keys``) on the scoring stream of ``seed``, as
    :func:`igd_cli.scoring.classify` draws it."""
    from ..scoring import score_stream

    changes = contract.changes_prediction(defense)
    device = module_device(defense)
    out = torch.empty(rows, len(x), dtype=torch.bool, device=device)  # on the device: one transfer at the end
    keys = keys.to(device)
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        with noise.images(keys[i:i + batch_size], score_stream(seed)):
            for r in range(rows):
                out[r, i:i + batch_size] = changes(xb)
    return out.cpu()


def mask_acts(audit: Audit) -> CheckResult:
    """Check 9: the share of clean and adversarial images (the white-box attack on the defence) on which the
    defended prediction differs from the argmax of the soft pseudo-label: where it never does, the defence is
    its pseudo-label, i.e. a one-sample noisy classifier."""
    if not audit.has_defense:
        return _na(9, "does the mask act?")
    if contract.changes_prediction(audit.defense) is None:
        return _na(9, "does the mask act?", "IG-Defense's check: this defence offers no changes_prediction(x)")
    rows = max(1, rows_for(audit.defense, audit.protocol, audit.draws) // 2)  # the protocol's final draws
    wb = audit.whitebox()
    shares, tests = {}, {}
    points = [("clean", audit.x)] + ([(wb, audit.adversarial(wb))] if audit.no_gradient(wb) is None else [])
    for name, x in points:
        bits = mask_change_share(audit.defense, x, audit.y, rows, keys=audit.keys, seed=audit.seed,
                                 batch_size=audit.batch_size)
        per_draw = bits.float().mean(1)
        tests[name] = per_image_test(bits.double().mean(0), "mask_acts_share", "below")
        shares[name] = {"mean": float(per_draw.mean()), "std": float(per_draw.std()) if rows > 1 else 0.0,
                        "images_ever": int(bits.any(0).sum()), "n": len(x), "draws": rows,
                        "test": tests[name].to_json()}
    idle = [k for k, t in tests.items() if t.flag]
    bad = bool(idle)

    def t(s: dict) -> str:
        return f"{100 * s['mean']:.2f}" + (f" ± {100 * s['std']:.2f}" if s["draws"] > 1 else "") + " %"

    text = "; ".join(f"{k}: {t(s)} ({s['images_ever']}/{s['n']} images in some draw)" for k, s in shares.items())
    meaning = (f"on the {' and '.join(idle)} images the mask (almost) never changes the prediction from argmax ŷ: "
               "there the defence is its pseudo-label, a one-sample noisy classifier, and what it gains or loses "
               "comes from the smoothing noise, not from the interpretability ranking") if bad else \
        "the mask is not shown to act on fewer images than the threshold, clean and adversarial: the ranking acts"
    return CheckResult(9, "does the mask act?", "flag" if bad else "ok", shares, text, meaning)


def smoothing_alone(audit: Audit) -> CheckResult:
    """Check 10 (the paper's Table 6, row 2): the base model with the same noise and no mask, scored the same way
    (IW-WC: the base model's six transfer sets and the three direct attacks run against it, repeated draws); the
    defence's gain over it is what the interpretability ranking contributes. Flags only when the data show the
    gain is below the threshold (noise never raises the flag)."""
    if not audit.has_defense:
        return _na(10, "smoothing alone")
    if audit.variant("smoothed") is None:
        return _na(10, "smoothing alone", "IG-Defense's check: this defence offers no baseline(seed) to compare with")
    defended, smooth, base = audit.iwwc("audited"), audit.iwwc("smoothed"), audit.robust(list(TRANSFER), "base")
    test = paired(defended, smooth, "smoothing_gain", "below")
    bad = test.flag
    label = contract.label(audit.defense)
    alone = "smoothing alone" if label == "IG-Defense" else "its baseline"
    text = (f"IW-WC: {label} {defended.text()} vs {alone} {smooth.text()} vs base {base.text()}; "
            f"gain {test.text()}")
    t = 100 * THRESHOLDS["smoothing_gain"]
    meaning = (f"the defence gains {test.text()} over the same noise without a mask, shown to be below {t:.1f} "
               "points: the interpretability ranking adds nothing measurable beyond smoothing") if bad else \
        (f"the mask adds {test.text()} over smoothing alone: not shown to be below {t:.1f} points"
         + ("" if test.estimate - test.z * test.se > test.threshold else " (nor shown above: more images decide)"))
    return CheckResult(10, "smoothing alone (Table 6)", "flag" if bad else "ok",
                       {"defended": defended.to_json(), "smoothing_alone": smooth.to_json(),
                        "base": base.to_json(), "gain": test.estimate, "test": test.to_json()}, text, meaning)
