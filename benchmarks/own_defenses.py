"""The example defences of ``examples/defenses/`` through igd's evaluation (docs/own-defense.md), on the demo model,
against independent reference attacks written here.

For each defence: IW-WC with ``--no-skip`` (every column its own accuracy: clean, the direct attacks, the six
transferred from the base model, the adaptive column), the audit's checks 1, 2, 6 and 7 on the same sets, and a
reference attack that does not go through igd's attacks — for a deterministic defence BPDA-PGD (the transform's
forward, the identity as its backward; Athalye et al., ICML 2018), for a randomized one PGD with EoT (the gradient
summed over ``--ref-eot`` forwards), each ``--ref-steps`` sign steps of ε/4 from the clean image (by default igd's own
budget: 10 steps, 4 EoT samples), scored by the
mean over 32 draws at its points. Written to ``--out`` (JSON):

    python benchmarks/own_defenses.py --n 100 --steps 10 --queries 200 --eot-iter 4 --draws 5 \\
        --out benchmarks/results/own-defenses-demo-cpu.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import ROOT, write_results  # noqa: E402

DEFENSES = ("bit_depth", "jpeg", "random_resize", "smoothing")


def pgd(forward, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, eot: int) -> torch.Tensor:
    """ℓ∞ PGD from the clean image, sign steps of ε/4, cross-entropy summed over ``eot`` forwards per step."""
    xa = x.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = sum(F.cross_entropy(forward(xa), y, reduction="sum") for _ in range(eot))
        (g,) = torch.autograd.grad(loss, xa)
        xa = (x + (xa.detach() + eps / 4 * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return xa.detach()


def reference(name: str, defended, base, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, eot: int):
    """(mean accuracy, per-image accuracy) of the defence at the reference attack's points."""
    inner = defended.defense  # the user's module itself: outside igd's evaluation, torch's generator
    torch.manual_seed(0)
    if name in ("bit_depth", "jpeg"):
        transform = inner.squeeze if name == "bit_depth" else inner.compress
        xa = pgd(lambda z: base(z + (transform(z) - z).detach()), x, y, eps, steps, 1)
        draws = 1
    else:
        xa = pgd(inner, x, y, eps, steps, eot)
        draws = 32
    with torch.no_grad():
        per = torch.stack([inner(xa).argmax(1) == y for _ in range(draws)]).float().mean(0)
    return per.mean().item(), per


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--eot-iter", type=int, default=4)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=10)
    ap.add_argument("--ref-eot", type=int, default=4)
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from igd_cli import contract
    from igd_cli.audit import Audit, run_audit
    from igd_cli.common import open_target
    from igd_cli.evaluate import Budgets, evaluate_defense

    target = open_target("demo", None, None, "Linf", "cpu", None)
    data = target.data("test", args.n, None)
    b = data.all()
    eps = float(target.loaded.eps)
    budgets = Budgets(steps=args.steps, restarts=1, queries=args.queries, eot_iter=args.eot_iter)
    result = {"model": "demo", "dataset": "digits (test)", "n": len(data), "eps": eps,
              "budget": budgets.kwargs(), "draws": args.draws, "skip": False,
              "reference": {"steps": args.ref_steps, "eot": args.ref_eot, "step_size": "eps/4", "score_draws": 32},
              "torch": torch.__version__, "python": platform.python_version(), "defenses": {}}
    with tempfile.TemporaryDirectory() as work:
        for name in args.defenses.split(","):
            t0 = time.perf_counter()
            spec = f"examples/defenses/{name}.py:{name}"
            d = contract.build_defense(str(ROOT / f"examples/defenses/{name}.py") + f":{name}", target.model)
            ref_mean, ref_per = reference(name, d, target.model, b.x, b.y, eps, args.ref_steps, args.ref_eot)
            res = evaluate_defense(target, d, data, attack="iw-wc", workdir=work, budgets=budgets, skip=False,
                                   draws=args.draws, show_progress=False)
            j = res.to_json()
            worst = res.worst().float().mean(0)
            over = {"steps": args.steps, "restarts": 1, "queries": args.queries, "eot_iter": args.eot_iter}
            audit = run_audit(Audit(target, data, eps=eps, defense=d, workdir=work, overrides=over,
                                    draws=args.draws, show_progress=False), [1, 2, 6, 7])
            direct = {k: v for k, v in j["robust_accuracy"].items() if k in ("aa", "rays", "apgd-eot")}
            transfer = {k: v for k, v in j["robust_accuracy"].items() if k.startswith("tr-")}
            result["defenses"][name] = {
                "defense": spec, "randomized": j["randomized"], "settings": contract.settings(d),
                "base_clean": j["base_clean_accuracy"], "base_worst_case": j["base_worst_case"],
                "clean": j["clean_accuracy"], "direct": direct, "direct_best": min(direct.values()) if direct else None,
                "no_gradient": j["no_gradient"], "transfer": transfer, "transfer_best": min(transfer.values()),
                "adaptive": j["robust_accuracy"].get("adaptive"), "iw_wc": j["worst_case"],
                "iw_wc_std": j.get("worst_case_std"), "iw_wc_paper": j.get("iw_wc_paper"),
                "reference": ref_mean,
                "images_reference_breaks_igd_does_not": int(((ref_per == 0) & (worst > 0)).sum()),
                "audit": {c["id"]: {"verdict": c["verdict"], "summary": c["summary"]} for c in audit["checks"]},
                "seconds": round(time.perf_counter() - t0, 1)}
            print(name, {k: result["defenses"][name][k] for k in ("clean", "direct_best", "transfer_best",
                                                                 "adaptive", "iw_wc", "reference")}, flush=True)
            write_results(args.out, result)


if __name__ == "__main__":
    main()
