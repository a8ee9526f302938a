"""Every threshold of ``igd audit`` in one documented dict, and the budget presets.

Accuracies are fractions of the audited images (0.02 = 2 points); losses are cross-entropy in nats.

The statistical footing, the same for every comparison of checks 2-5 and 7-10:

- every figure is a per-image vector ``p_i`` in [0, 1]: image i's correctness in the final draws of its
  selected candidate (:mod:`igd_cli.scoring`), averaged over those R draws (0 or 1 for a deterministic model),
  or, for check 9, the share of draws in which the mask changes the prediction;
- two figures A and B on the same images are compared through the paired per-image differences
  ``d_i = p^A_i - p^B_i``: the estimate is their mean ``d̄`` (= A's accuracy − B's) and its standard error
  ``se = sd(d) / √n`` (sample standard deviation over the n images). A single figure against a level (check 5's
  near-zero, check 9's share) is the same with ``d_i = p_i``. The standard error holds both sources of noise,
  the draws (inside each ``p_i``) and the choice of images;
- a check flags only when the data show its problem beyond that noise, at ``z`` standard errors
  (``z = 2``: about 2.3 % one-sided false alarms on an honest model whose true difference sits at the threshold):
  "A may exceed B by at most t" flags when ``d̄ − z·se > t``; "A must exceed B by more than t" (check 10, and
  check 9's share) flags when ``d̄ + z·se < t``, i.e. when the data show the gain (share) is below t. More noise
  widens ``se`` and so only ever removes a flag: noise alone never raises one.

Check 1 (AutoAttack's warnings) and check 6 (loss surface, per image) are not comparisons of accuracies.
"""

from __future__ import annotations

from typing import Any

THRESHOLDS: dict[str, float] = {
    # 2. black-box vs white-box: the best black-box attack (Square, RayS) may beat the best white-box one by at
    #    most this much (Table 9: a stronger black-box attack is the classic sign of masked gradients)
    "blackbox_margin": 0.02,
    # 3. stronger AutoAttack (every APGD — the white-box APGD and APGD-T — 200 steps × 10 restarts, FAB-T 10
    #    restarts, Square 5 restarts) may lower the standard AutoAttack accuracy by at most this much
    "stronger_aa_drop": 0.02,
    # 4. robust accuracy may rise by at most this much from fewer to more attack steps (Fig. 7C)
    "steps_rise": 0.01,
    # 5. robust accuracy may rise by at most this much from a budget to a larger one (Table 10) ...
    "budget_rise": 0.01,
    # ... and must be at most this at the largest budget (an attack with 4ε must win)
    "budget_near_zero": 0.05,
    # 6. loss surface: an image is flagged when the best grid point beats the best point along the gradient
    #    direction by more than surface_rel · the gradient line's own loss gain + surface_margin nats (numerical
    #    slack); the orthogonal direction changes nothing in a locally linear loss, so on an honest model the
    #    grid's best lies on the gradient line and the excess is curvature, a fraction of the line's gain ...
    "surface_margin": 1e-3,
    "surface_rel": 0.25,
    # ... and the check flags when more than this share of the surface images is flagged
    "surface_share": 0.0,
    # 7. the direct attacks on the defence may be weaker than the same attacks transferred from the base model
    #    by at most this much (Croce et al.: a defence that hides its gradients from its own attacker)
    "transfer_margin": 0.02,
    # 8. the randomized defence may exceed its frozen-noise copy (one fixed draw, deterministic) by at most this
    #    much: a larger gain exists only with fresh noise, so it comes from randomness, not from the mask
    "frozen_gain": 0.02,
    # 9. the mask acts when the defended prediction differs from argmax ŷ on at least this share of the clean and
    #    of the adversarial images; flagged when the data show a share below it: there the defence is a one-sample
    #    noisy classifier
    "mask_acts_share": 0.01,
    # 10. the defence's IW-WC should beat smoothing alone's (same noise, no mask) by more than this for the ranking
    #     to count; flagged when the data show the gain is below it
    "smoothing_gain": 0.02,
    # standard errors of the paired per-image differences a comparison must clear (see the module doc)
    "z": 2.0,
}

#: Budgets per preset. ``quick`` keeps the pipeline's quick budgets (steps 20, restarts 1, queries 1000, EoT 5),
#: so the transfer and IW-WC sets of ``igd pipeline`` are reused; ``paper`` the paper's (Appendix B.3, C.2).
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"n_examples": 100, "steps": 20, "restarts": 1, "queries": 1000, "eot_iter": 5,
              "steps_curve": [5, 10, 20], "stronger": {"steps": 40, "restarts": 3, "fab_restarts": 3,
                                                      "square_restarts": 2},
              "surface_images": 4, "surface_grid": 11, "surface_draws": 4, "budget_factors": [1, 2, 4]},
    "paper": {"n_examples": 1000, "steps": None, "restarts": None, "queries": None, "eot_iter": None,
              "steps_curve": [10, 50, 100], "stronger": {"steps": 200, "restarts": 10, "fab_restarts": 10,
                                                        "square_restarts": 5},
              "surface_images": 8, "surface_grid": 21, "surface_draws": 8, "budget_factors": [1, 2, 4]},
}
