"""The adaptive attack (docs/adaptive.md) against the paper's nine IW-WC columns.

Two measurements, written to ``--out`` (JSON, rewritten after each part):

1. ``--sweep``: the adaptive attack alone at each BPDA temperature T (``--sweep-n`` test images from
   ``--sweep-start``, by default the ones after the ``--n`` evaluated images: T is chosen on held-out images), its robust
   accuracy (mean ± std over the draws of igd's repeated-draw scoring) and seconds;
2. IW-WC with ``--no-skip`` (every column its own accuracy) and the adaptive column at ``--temperature``
   (default: the sweep's strongest T): the adaptive column against each of the nine, IW-WC over the nine vs
   the ten, and the wall-time ratio adaptive / nine (the attacks' own seconds, from their set artifacts, all
   made in this run when ``--workdir`` starts empty).

    python benchmarks/bench_adaptive.py --mask runs/demo/mask-lo-ir-block3.safetensors --n 200 \\
        --steps 20 --eot-iter 5 --queries 1000 --restarts 1 --sweep 1,2,5,10 --sweep-n 200 \\
        --workdir runs/adaptive-demo --out benchmarks/results/adaptive-demo-200-quick-cpu.json

A state-dict model takes igd's ``--arch``, ``--dataset`` (a tensor file) and ``--normalize``; docs/adaptive.md
gives the commands for the MNIST example and the CIFAR-10 ResNet-18.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--dataset", default=None, help="data set name or PATH.safetensors (default: the model's own)")
    ap.add_argument("--normalize", default=None, help="igd's --normalize for a state-dict model without it")
    ap.add_argument("--mask", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--eps", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eot-iter", type=int, default=None)
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--restarts", type=int, default=None)
    ap.add_argument("--sweep", default="", help="temperatures, comma-separated (empty: no sweep)")
    ap.add_argument("--sweep-n", type=int, default=None, help="images of the sweep (default --n)")
    ap.add_argument("--sweep-start", type=int, default=None,
                    help="first test image of the sweep (default --n: the images after the evaluated ones, so that "
                         "T is not chosen on the images its figure is reported on)")
    ap.add_argument("--temperature", type=float, default=None, help="IW-WC's adaptive column (default: best of sweep)")
    ap.add_argument("--no-iwwc", action="store_true")
    ap.add_argument("--available-only", action="store_true", help="instead of IW-WC: score only the columns whose "
                    "sets are already in --workdir (an interrupted IW-WC), the adaptive column at --temperature")
    ap.add_argument("--ablation", action="store_true", help="also: stage 1 alone, and stage 2 without BPDA "
                    "(first --sweep-n images; added to an existing --out)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from igd_cli.artifacts import read_metadata
    from igd_cli.common import open_target, parse_eps
    from igd_cli.defense import load_defense
    from igd_cli.evaluate import (DIRECT, TRANSFER, Budgets, Evaluator, column_key, defense_identity,
                                  evaluate_defense)
    from igd_cli.scoring import Score, final_of_selected

    target = open_target(args.model, args.arch, args.dataset, "Linf", "cpu", None, args.normalize)
    eps = parse_eps(args.eps) if args.eps else target.default_eps("the attacks")
    defense = load_defense(target, args.mask)
    ident = defense_identity(args.mask, defense)
    budgets = Budgets(steps=args.steps, restarts=args.restarts, queries=args.queries, eot_iter=args.eot_iter)
    out: dict = {"command": "python " + " ".join(sys.argv), "model": args.model, "arch": args.arch,
                 "dataset": target.dataset, "normalize": args.normalize, "mask": args.mask,
                 "defense": defense.settings(), "layer": defense.layer, "k": defense.k, "eps": eps,
                 "budgets": budgets.kwargs(), "device": "cpu", "threads": torch.get_num_threads(),
                 "load_at_start": os.getloadavg(), "python": platform.python_version()}
    if Path(args.out).exists():  # parts measured by earlier runs (another --sweep, --ablation) are kept
        before = json.loads(Path(args.out).read_text())
        out.update({k: before[k] for k in ("sweep", "ablation", "iwwc") if k in before})
        out["earlier_commands"] = before.get("earlier_commands", []) + [before.get("command")]

    def save() -> None:
        write_results(args.out, out)

    if args.ablation:
        out = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else out
        out["ablation"] = ablation(target, defense, target.data("test", args.sweep_n or args.n, None), eps, budgets)
        out["ablation"]["command"] = "python " + " ".join(sys.argv)
        save()
        return
    temps = [float(t) for t in args.sweep.split(",") if t.strip()]
    if temps:
        start = args.n if args.sweep_start is None else args.sweep_start
        data = target.data("test", None, None).view(start, start + (args.sweep_n or args.n))
        sweep = {}
        for t in temps:
            ev = Evaluator(target, defense, data, eps=eps, budgets=budgets, workdir=args.workdir,
                           defense_meta=ident, show_progress=False, bpda_temperature=t,
                           batch_size=args.batch_size)
            t0 = time.perf_counter()
            _, _, bits = ev.obtain("adaptive", "defended", ev.positions)
            s = Score.of(final_of_selected([ev.clean("defended"), bits]))
            sweep[str(t)] = {"robust_accuracy": s.mean, "std": s.std, "majority": s.majority,
                             "all_draws": s.all_draws, "score": s.to_json(),
                             "seconds": round(time.perf_counter() - t0, 1), "load": os.getloadavg()}
            print(f"T={t:g}: {100 * s.mean:.2f} ± {100 * s.std:.2f} %", flush=True)
            out["sweep"] = {"n": len(data), "start": start, "held_out": start >= args.n, "temperatures": sweep}
            save()
    if args.no_iwwc:
        return
    if args.available_only:
        out["available"] = available(target, defense, ident, target.data("test", args.n, None), eps, budgets,
                                     args.workdir, args.temperature)
        out["available"]["command"] = "python " + " ".join(sys.argv)
        save()
        return
    t_iwwc = args.temperature
    if t_iwwc is None and temps:
        t_iwwc = min(temps, key=lambda t: (out["sweep"]["temperatures"][str(t)]["robust_accuracy"], t))
    data = target.data("test", args.n, None)
    res = evaluate_defense(target, defense, data, attack="iw-wc", workdir=args.workdir, budgets=budgets, eps=eps,
                           skip=False, defense_meta=ident, show_progress=False, bpda_temperature=t_iwwc,
                           batch_size=args.batch_size)
    j = res.to_json()
    nine = [*DIRECT, *[column_key(a, True) for a in TRANSFER]]
    metas = {k: read_metadata(p) for k, p in j["sets"].items() if p}
    seconds = {k: m.get("seconds") for k, m in metas.items()}
    # per image attacked (a set reused from a run on more images keeps that run's seconds and count)
    per_image = {k: m["seconds"] / m["n_attacked"] for k, m in metas.items() if m.get("seconds") and m.get("n_attacked")}
    nine_seconds = sum(per_image[k] for k in nine if k in per_image)
    clean = res.clean_defended
    paired = {}
    for k in nine:  # the adaptive column minus each of the nine, per image (mean over final draws)
        a = final_of_selected([clean, res.defended["adaptive"]]).float().mean(0)
        b = final_of_selected([clean, res.defended[k]]).float().mean(0)
        d = a - b
        paired[k] = {"difference": float(d.mean()), "standard_error": float(d.std() / len(d) ** 0.5)}
    strongest = min(nine, key=lambda k: j["robust_accuracy"][k])
    out["iwwc"] = {
        "n": j["n_examples"], "bpda_temperature": t_iwwc,
        "clean": [j["clean_accuracy"], j["clean_accuracy_std"]], "base_clean": j["base_clean_accuracy"],
        "columns": {k: [j["robust_accuracy"][k], j["robust_accuracy_std"][k]] for k in j["robust_accuracy"]},
        "base_columns": j["base_robust_accuracy"],
        "adaptive_minus_column": paired, "strongest_of_nine": strongest,
        "iw_wc_paper": [j["iw_wc_paper"], j["iw_wc_paper_std"], j["iw_wc_paper_majority"],
                        j["iw_wc_paper_all_draws"]],
        "iw_wc_ten": [j["worst_case"], j["worst_case_std"], j["worst_case_majority"], j["worst_case_all_draws"]],
        "base_iw_wc": j["base_worst_case"],
        "set_seconds": seconds, "set_seconds_per_image": per_image, "nine_seconds_per_image": nine_seconds,
        "set_n_attacked": {k: m.get("n_attacked") for k, m in metas.items()},
        "wall_time_ratio_adaptive_over_nine": per_image["adaptive"] / nine_seconds if nine_seconds else None,
        "load_at_end": os.getloadavg(), "result": j,
    }
    print(json.dumps({k: v for k, v in out["iwwc"].items() if k != "result"}, indent=1, default=str), flush=True)
    save()


def available(target, defense, ident, data, eps, budgets, workdir, temperature) -> dict:
    """The columns of IW-WC whose sets are in ``workdir`` (made for at least these images), each scored like
    IW-WC's, the adaptive column against each (paired per-image differences) and the worst cases over them."""
    from igd_cli.attacks import make_attack
    from igd_cli.evaluate import DIRECT, TRANSFER, Evaluator, column_key, load_set, restrict
    from igd_cli.scoring import Score, final_of_selected

    ev = Evaluator(target, defense, data, eps=eps, budgets=budgets, workdir=workdir, defense_meta=ident,
                   show_progress=False, bpda_temperature=temperature)
    cols = {}
    for kind, names in (("base", TRANSFER), ("defended", (*DIRECT, "adaptive"))):
        for a in names:
            model = ev._model(kind)
            atk = make_attack(a, model, eps=eps, seed=0, num_classes=target.loaded.num_classes, strict=False,
                              **budgets.kwargs(), bpda_temperature=temperature)
            path = ev._path(ev._key_meta(atk.describe(), kind))
            part = restrict(load_set(path, data, eps=eps), ev.positions) if path.exists() else None
            if part is not None:
                cols[column_key(a, kind == "base")] = ev.column(part, "defended")
    clean = ev.clean("defended")
    own = {k: final_of_selected([clean, b]) for k, b in cols.items()}
    out = {"n": len(data), "bpda_temperature": temperature, "columns": {}, "missing": [], "load": os.getloadavg()}
    for k in [*[column_key(a, True) for a in TRANSFER], *DIRECT]:
        if k not in cols:
            out["missing"].append(k)
            continue
        d = own["adaptive"].float().mean(0) - own[k].float().mean(0)
        s = Score.of(own[k])
        out["columns"][k] = {"accuracy": s.mean, "std": s.std,
                             "adaptive_minus_column": float(d.mean()), "standard_error": float(d.std() / len(d) ** 0.5)}
    a = Score.of(own["adaptive"])
    out["adaptive"] = {"accuracy": a.mean, "std": a.std, "majority": a.majority, "all_draws": a.all_draws}
    others = [b for k, b in cols.items() if k != "adaptive"]
    w_without = Score.of(final_of_selected([clean, *others]))
    w_with = Score.of(final_of_selected([clean, *others, cols["adaptive"]]))
    out["worst_case_available_without_adaptive"] = w_without.to_json()
    out["worst_case_available_with_adaptive"] = w_with.to_json()
    out["clean"] = Score.of(clean[: clean.shape[0] // 2] if clean.shape[0] > 1 else clean).to_json()
    print(json.dumps(out, indent=1, default=str), flush=True)
    return out


def ablation(target, defense, data, eps, budgets) -> dict:
    """Stage 1 alone (apgd-eot on the smoothed first pass) and both stages with stage 2 on the true gradient
    (no BPDA), each scored like IW-WC's columns (the protocol over {clean, its point})."""
    from igd_cli.attacks import run_attack
    from igd_cli.attacks.adaptive import Adaptive
    from igd_cli.attacks.apgd import APGDEoT
    from igd_cli.scoring import score_set

    kw = {"eps": eps, "num_classes": target.loaded.num_classes,
          **{k: v for k, v in budgets.kwargs().items() if k in ("steps", "restarts", "eot_iter") and v}}

    class Stage1(Adaptive):
        def perturb(self, x, y, index):
            return APGDEoT(self.stages()[0], eps=self.eps, seed=self.seed, randomized=self.randomized,
                           num_classes=self.num_classes, **self._budget_of()).perturb(x, y, index)

    no_bpda = Adaptive(defense, **kw)
    no_bpda.temperature = None  # IGDefense.bpda(None): the switch stays off
    x = data.all().x
    res = {}
    for name, atk in (("stage 1 alone", Stage1(defense, **kw)), ("stage 2 without BPDA", no_bpda)):
        t0 = time.perf_counter()
        r = run_attack(atk, data, show_progress=False)
        _, rob = score_set(defense, x, r.x_adv, r.y)
        res[name] = {"robust_accuracy": rob.mean, "std": rob.std, "score": rob.to_json(),
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {100 * rob.mean:.2f} ± {100 * rob.std:.2f} %", flush=True)
    return {"n": len(data), "variants": res, "load": os.getloadavg()}


if __name__ == "__main__":
    main()
