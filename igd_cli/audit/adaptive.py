"""Audit check: the adaptive attack (docs/adaptive.md) against the paper's nine IW-WC columns.

The paper's image-wise worst case is an upper bound only if no attack designed against the defence lowers it.
The check adds the adaptive column to the nine and flags when the worst case over ten is lower than over nine
by more than its noise: the mean of the paired per-image differences (per image, the share of final draws its
selected point is correct in, nine minus ten) exceeds ``z`` standard errors of those differences. The paper's
evaluation then overstates the defence.

Check 11 of :data:`igd_cli.audit.CHECKS`, on the audit's one statistical footing
(:func:`igd_cli.audit.context.per_image_test`: paired per-image differences, their standard error, z of
:data:`~igd_cli.audit.thresholds.THRESHOLDS`): :func:`adaptive_vs_nine` is the pure verdict on per-image bits,
:func:`adaptive_check` obtains them through an :class:`Audit`.

Example::

    res = adaptive_vs_nine(clean_bits, {"aa": aa_bits, ...}, adaptive_bits)
    print(res.verdict, res.summary)
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..scoring import Score, final_of_selected
from .context import per_image_test
from .result import CheckResult
from .thresholds import THRESHOLDS

#: the check's number in the audit table (after the paper's ten)
CHECK_ID = 11
NAME = "adaptive attack (beyond the paper)"
#: standard errors of the paired per-image differences a lower worst case must exceed to be flagged (the audit's z)
Z = THRESHOLDS["z"]


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-image differences ``a − b`` of two (R, n) final-draw bit tensors (per
    image the share of draws correct), as every audit comparison computes them (:func:`per_image_test`)."""
    t = per_image_test(a.float().mean(0) - b.float().mean(0), 0.0)
    return t.estimate, t.se


def adaptive_vs_nine(clean: torch.Tensor, nine: Mapping[str, torch.Tensor], adaptive: torch.Tensor, *,
                     z: float = Z, cid: int = CHECK_ID) -> CheckResult:
    """The verdict from the per-image, per-draw bits (D, n) (:mod:`igd_cli.scoring` layout) of the clean images,
    the paper's nine columns (in IW-WC's scoring order) and the adaptive column on the defended model."""
    cols = list(nine.values())
    w9 = final_of_selected([clean, *cols])
    w10 = final_of_selected([clean, *cols, adaptive])
    gain, se = paired(w9, w10)  # how much the adaptive column lowers the worst case (≥ 0 up to selection noise)
    flagged = gain > 0 and gain > z * se
    own = final_of_selected([clean, adaptive])
    per_column = {}
    for k, bits in nine.items():
        d, s = paired(final_of_selected([clean, bits]), own)
        per_column[k] = {"accuracy": Score.of(final_of_selected([clean, bits])).mean, "adaptive_lower_by": d,
                         "standard_error": s}
    s9, s10, sa = Score.of(w9), Score.of(w10), Score.of(own)
    stronger = [k for k, v in per_column.items() if v["adaptive_lower_by"] > z * v["standard_error"]
                and v["adaptive_lower_by"] > 0]
    summary = (f"IW-WC over the nine {_pct(s9)} vs with the adaptive column {_pct(s10)} (lower by "
               f"{100 * gain:.2f} ± {100 * se:.2f} points, paired per image); adaptive alone {_pct(sa)}, "
               f"stronger than {len(stronger)} of the nine columns by more than {z:g} standard errors")
    meaning = ("an attack designed against the defence lowers the paper's worst case by more than its noise: the "
               "nine standard attacks overstate the defence; report the worst case over all ten") if flagged else \
        ("the adaptive attack does not lower the paper's worst case beyond its noise: the nine columns are a fair "
         "upper bound here")
    figures = {"iw_wc_paper": s9.to_json(), "iw_wc_ten": s10.to_json(), "adaptive": sa.to_json(),
               "lowered_by": gain, "standard_error": se, "z": z, "per_column": per_column,
               "adaptive_stronger_than": stronger}
    return CheckResult(cid, NAME, "flag" if flagged else "ok", figures, summary, meaning)


def _pct(s: Score) -> str:
    return f"{100 * s.mean:.2f}" + (f" ± {100 * s.std:.2f}" if s.draws > 1 else "") + " %"


def adaptive_check(audit) -> CheckResult:
    """The check on an :class:`igd_cli.audit.context.Audit` (n/a without a defence): the nine columns as
    ``Audit.iwwc`` obtains them (a gradient column left out where the defence has no gradient), the adaptive
    attack on the audited defence at the audit's budgets."""
    from ..evaluate import DIRECT_RUN_ORDER, TRANSFER

    if not audit.has_defense:
        return CheckResult(CHECK_ID, NAME, "n/a", {}, "needs a defence: give --mask or --defense", "")
    why = audit.no_gradient("adaptive")
    if why is not None:
        return CheckResult(CHECK_ID, NAME, "n/a", {"no_gradient": why},
                           "the defence has no gradient and no surrogate(x): no adaptive attack to run", "")
    clean = audit.bits(TRANSFER[0], "base", on="audited")[0]
    nine = {f"tr-{a}": audit.bits(a, "base", on="audited")[1] for a in TRANSFER}
    nine.update({a: audit.bits(a, "audited")[1] for a in audit.runnable(DIRECT_RUN_ORDER)})
    return adaptive_vs_nine(clean, nine, audit.bits("adaptive", "audited")[1])
