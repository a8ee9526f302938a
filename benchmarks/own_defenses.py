"""The example defences of ``examples/defenses/`` through igd's evaluation (docs/own-defense.md), on the demo model,
against independent reference attacks written here.

For each defence: IW-WC with ``--no-skip`` (every column its own accuracy: clean, the direct attacks, the six
transferred from the base model, the adaptive column), the audit's checks 1, 2, 6 and 7 on the same sets, and a
reference attack that does not go through igd's attacks — for a deterministic defence BPDA-PGD (the transform's
forward, the identity as its backward; Athalye et al., ICML 2018), for a randomized one PGD with EoT (the gradient
summed over ``--ref-eot`` forwards), each ``--ref-steps`` sign steps of ε/4 from the clean image (by default igd's own
budget: 10 steps, 4 EoT samples), scored by the
mean over 32 draws at its points.

For a randomized defence, every candidate point (clean, each column's, the reference's) is also classified
``--check-draws`` times on a noise stream of its own: each column's accuracy and the reference's then carry little
noise, and the points the worst case selected on its ``--draws`` selection draws are scored the same way, which
splits a gap between the worst case and the reference into the attacks' strength and the per-image selection's
noise; and the same sets are scored again at ``--more-draws`` selection and final draws (``igd defend-eval
--draws``), and at ``--draws`` with the margin tie-break (``--protocol draws-margin``).
Written to ``--out`` (JSON):

    python benchmarks/own_defenses.py --n 100 --steps 10 --queries 200 --eot-iter 4 --draws 5 \\
        --out benchmarks/results/own-defenses-demo-cpu.json

Another model: ``--model``, ``--arch``, ``--normalize``, ``--dataset`` and ``--eps`` as igd takes them.
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

from _data import ROOT, command_line, write_results  # noqa: E402

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
    """(mean accuracy, per-image accuracy, points, std over the draws) of the defence at the reference attack's
    points."""
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
        bits = torch.stack([inner(xa).argmax(1) == y for _ in range(draws)]).float()  # (draws, n)
    per_draw = bits.mean(1)
    return per_draw.mean().item(), bits.mean(0), xa, per_draw.std().item() if draws > 1 else 0.0


def many_draws(defended, data, res, ref_x: torch.Tensor, eps: float, draws: int, margin_res=None) -> dict:
    """Every candidate of the worst case (clean, each column's point), the reference's point and the points the
    worst case selected (and those ``margin_res``, the same sets under ``draws-margin``, selected), each classified
    ``draws`` times on a stream of its own: accuracy with little noise."""
    from igd_cli import noise
    from igd_cli.adv_sets import load_set
    from igd_cli.scoring import classify, selected

    b = data.all()
    keys = noise.image_keys(b.index, b.x)
    stream = noise.stream(0, "benchmark:many-draws")
    names = ["clean", *res.defended]
    points = [b.x] + [load_set(res.sets[k], data, eps=eps).x_adv for k in res.defended]
    acc = torch.stack([classify(defended, p, b.y, draws, keys=keys, stream=stream).float().mean(0) for p in points])
    pick = selected(res.candidates(True))  # per image, the candidate the worst case kept (on its selection draws)
    ref = classify(defended, ref_x, b.y, draws, keys=keys, stream=stream).float().mean(0)
    out = {"draws": draws, "columns": {k: round(acc[i].mean().item(), 4) for i, k in enumerate(names)},
            "best_column": min(names[1:], key=lambda k: acc[names.index(k)].mean().item()),
            "reference": round(ref.mean().item(), 4),
            "worst_case_selected": round(acc.gather(0, pick.view(1, -1))[0].mean().item(), 4),
            "per_image_best_candidate": round(acc.min(0).values.mean().item(), 4),
            "selected_from": {k: int((pick == i).sum()) for i, k in enumerate(names)}}
    if margin_res is not None:
        assert ["clean", *margin_res.defended] == names, "the same candidates in the same order"
        pick = selected(margin_res.candidates(True), margin_res.candidate_margins(True))
        out["worst_case_selected_draws_margin"] = round(acc.gather(0, pick.view(1, -1))[0].mean().item(), 4)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--eot-iter", type=int, default=4)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--ref-steps", type=int, default=10)
    ap.add_argument("--ref-eot", type=int, default=4)
    ap.add_argument("--defenses", default=",".join(DEFENSES), help="comma-separated FILE (examples/defenses/FILE.py:"
                    "FILE) or FILE:NAME")
    ap.add_argument("--check-draws", type=int, default=64, help="classifications of every candidate of a randomized "
                    "defence on a stream of its own (0: none)")
    ap.add_argument("--more-draws", type=int, default=20, help="a randomized defence's sets scored again at these "
                    "--draws (0: not)")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--normalize", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from igd_cli import contract
    from igd_cli.audit import Audit, run_audit
    from igd_cli.common import open_target
    from igd_cli.evaluate import Budgets, evaluate_defense

    target = open_target(args.model, args.arch, args.dataset, "Linf", "cpu", None, args.normalize)
    data = target.data("test", args.n, None)
    b = data.all()
    eps = float(args.eps if args.eps is not None else target.loaded.eps)
    budgets = Budgets(steps=args.steps, restarts=1, queries=args.queries, eot_iter=args.eot_iter)
    result = {"command": command_line("own_defenses.py", argv), "model": args.model, "arch": args.arch,
              "normalize": args.normalize, "dataset": f"{data.name} ({data.split})", "n": len(data), "eps": eps,
              "budget": budgets.kwargs(), "draws": args.draws, "skip": False,
              "reference": {"steps": args.ref_steps, "eot": args.ref_eot, "step_size": "eps/4", "score_draws": 32},
              "torch": torch.__version__, "python": platform.python_version(), "defenses": {}}
    with tempfile.TemporaryDirectory() as work:
        for entry in args.defenses.split(","):
            t0 = time.perf_counter()
            stem, _, name = entry.partition(":")  # FILE (examples/defenses/FILE.py:FILE) or FILE:NAME
            name = name or stem
            spec = f"examples/defenses/{stem}.py:{name}"
            d = contract.build_defense(str(ROOT / spec), target.model)
            ref_mean, ref_per, ref_x, ref_std = reference(stem, d, target.model, b.x, b.y, eps, args.ref_steps,
                                                          args.ref_eot)
            res = evaluate_defense(target, d, data, attack="iw-wc", eps=eps, workdir=work, budgets=budgets,
                                   skip=False, draws=args.draws, show_progress=False)
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
                "reference": ref_mean, "reference_std": ref_std,
                # sample std over the final draws (0 for a deterministic defence): clean and every column
                "std": {"clean": j["clean_accuracy_std"], **j["robust_accuracy_std"]},
                "images_reference_breaks_igd_does_not": int(((ref_per == 0) & (worst > 0)).sum()),
                "audit": {c["id"]: {"verdict": c["verdict"], "summary": c["summary"]} for c in audit["checks"]},
                "seconds": round(time.perf_counter() - t0, 1)}
            margin_res = None
            if j["randomized"]:  # the same sets scored with the margin tie-break (--protocol draws-margin)
                margin_res = evaluate_defense(target, d, data, attack="iw-wc", eps=eps, workdir=work, budgets=budgets,
                                              skip=False, draws=args.draws, protocol="draws-margin",
                                              show_progress=False)
                m = margin_res.to_json()
                result["defenses"][name]["draws_margin"] = {"iw_wc": m["worst_case"], "iw_wc_std": m["worst_case_std"],
                                                            "columns": m["robust_accuracy"],
                                                            "columns_std": m["robust_accuracy_std"]}
            if j["randomized"] and args.check_draws > 0:
                result["defenses"][name]["many_draws"] = many_draws(d, data, res, ref_x, eps, args.check_draws,
                                                                    margin_res)
            if j["randomized"] and args.more_draws > 0:  # the same sets (draws are not in their identity) rescored
                more = evaluate_defense(target, d, data, attack="iw-wc", eps=eps, workdir=work, budgets=budgets,
                                        skip=False, draws=args.more_draws, show_progress=False).to_json()
                result["defenses"][name]["more_draws"] = {
                    "draws": args.more_draws, "iw_wc": more["worst_case"], "iw_wc_std": more.get("worst_case_std"),
                    "columns": more["robust_accuracy"], "columns_std": more["robust_accuracy_std"]}
            print(name, {k: result["defenses"][name][k] for k in ("clean", "direct_best", "transfer_best",
                                                                 "adaptive", "iw_wc", "reference")}, flush=True)
            write_results(args.out, result)
    return result


if __name__ == "__main__":
    main()
