"""Two IW-WC runs of the same defended model, measured in the same run, differing in one thing:

- ``--compare skip`` (default): with skipping (attacks on the defended model run only on images where they can
  still change the worst case) against without (every attack on every image);
- ``--compare protocol``: the repeated-draw scoring of a randomized defence (``--draws R``, Croce et al.) against
  the single-draw scoring (one draw per set, AND over sets), both with skipping.

The six base-model (transfer) sets are computed once, timed apart, and shared by both runs, as in real use
(they are reused by every defence of a base model). Prints both tables, the worst cases, the images on which
they differ, the time of the defended-model phase of each run and of the whole run (transfer sets included),
the ratios, and per direct attack the images it attacked and its seconds in each run.

Skipping can only save the work the attacks on the defended model spend on images an earlier attack broke; on
images that stay robust every attack must spend its whole budget either way. So the ratio is at most
``1 + (work on broken images without skipping) / (work on the survivors)``: large when most images break (a
weak model, a large ε), small for a robust model whose attacks already stop early on broken images.

    python benchmarks/bench_iwwc.py                       # demo model, 100 images, reduced budgets
    python benchmarks/bench_iwwc.py --paper --n 450       # the paper's budgets
    python benchmarks/bench_iwwc.py --compare protocol --mask MASK --n 200 --steps 20 --queries 1000 --restarts 1
    python benchmarks/bench_iwwc.py --mask MASK --eps 0.3  # another ε than the model's default
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import write_results  # noqa: E402  (also puts the repository on the path)
from igd_cli.artifacts import save_artifact  # noqa: E402
from igd_cli.common import open_target, parse_eps  # noqa: E402
from igd_cli.defense import load_defense  # noqa: E402
from igd_cli.evaluate import Budgets, defense_identity, evaluate_defense, render_table  # noqa: E402
from igd_cli.scoring import DEFAULT_DRAWS, alive  # noqa: E402


def random_mask(path: Path, target, layer: str, n: int, k: int) -> Path:
    """A k-of-N random mask per class (used only when no --mask is given: the timing hardly depends on it)."""
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(n, target.loaded.num_classes, dtype=torch.uint8)
    for c in range(m.shape[1]):
        m[torch.randperm(n, generator=g)[:k], c] = 1
    eps = target.default_eps()
    meta = {**target.provenance(), "layer": layer, "k": k, "importance_file": "random", "importance_sha256": "-",
            "method": "random", "defense": {"tau": 0.01, "sigma": eps / 2, "n_smooth": 1, "rs": True, "eps": eps}}
    return save_artifact(path, "mask", {"mask": m}, meta)


def transfer_survivors(res) -> torch.Tensor:
    """Images where the direct phase can still change the worst case after the transfer sets."""
    return alive([res.clean_defended, *[v for k, v in res.defended.items() if k.startswith("tr-")]])


#: what each comparison runs: (name, evaluate_defense keyword arguments) for the two runs
COMPARISONS = {
    "skip": lambda draws: [("skip", {"skip": True}), ("no-skip", {"skip": False})],
    "protocol": lambda draws: [("single-draw", {"protocol": "single-draw"}),
                               (f"draws-{draws}", {"protocol": "draws", "draws": draws})],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--mask", type=Path, default=None)
    ap.add_argument("--k", type=int, default=40, help="neurons kept per class in the random mask")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--eps", default=None, help="attack ε, e.g. 8/255 (default: the data set's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--paper", action="store_true", help="the paper's budgets (slow on CPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--eot-iter", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=None)
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="skip")
    ap.add_argument("--draws", type=int, default=DEFAULT_DRAWS)
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    os.environ.setdefault("IGD_NO_PROGRESS", "1")

    budgets = Budgets() if a.paper else Budgets(steps=a.steps, queries=a.queries, eot_iter=a.eot_iter,
                                                restarts=a.restarts)
    target = open_target(a.model, a.arch, a.dataset, "Linf", a.device)
    data = target.data("test", a.n)
    tmp = Path(tempfile.mkdtemp(prefix="bench_iwwc_"))
    mask = a.mask
    if mask is None:
        from igd_cli.common import resolve_model_layer

        layer, n_neurons = resolve_model_layer(target, None, tuple(data.get(0, 1).x.shape[1:]))
        mask = random_mask(tmp / "mask.safetensors", target, layer, n_neurons, a.k)
    defense = load_defense(target, mask, seed=0)
    ident = defense_identity(mask, defense)
    eps = parse_eps(a.eps) if a.eps is not None else target.default_eps()
    common = dict(attack="iw-wc", budgets=budgets, seed=0, batch_size=a.batch_size, defense_meta=ident,
                  show_progress=False, eps=eps)

    t = time.perf_counter()
    base = evaluate_defense(target, None, data, workdir=tmp / "base", **common)
    t_base = time.perf_counter() - t
    runs = {}
    (n_a, kw_a), (n_b, kw_b) = COMPARISONS[a.compare](a.draws)
    for name, kw in ((n_a, kw_a), (n_b, kw_b)):
        work = tmp / name
        shutil.copytree(tmp / "base", work)
        d = load_defense(target, mask, seed=0)
        t = time.perf_counter()
        res = evaluate_defense(target, d, data, workdir=work, **{**common, **kw})
        runs[name] = (res, time.perf_counter() - t)

    (fast, t_fast), (slow, t_slow) = runs[n_a], runs[n_b]
    for name, (res, _) in runs.items():
        render_table(res, title=f"IW-WC, {name}, {a.model}, {len(data)} images")
    direct = [k for k in fast.defended if not k.startswith("tr-")]
    per_attack = {k: {f"images_{n}": r.survivors_only.get(k, len(data)) for n, (r, _) in runs.items()}
                  | {f"seconds_{n}": round(r.seconds.get(k, 0.0), 2) for n, (r, _) in runs.items()} for k in direct}
    t = Table(title=f"defended-model phase, {a.model}, {len(data)} images, ε={eps:.4g}")
    cols = ["attack", f"images ({n_a})", f"s ({n_a})", f"images ({n_b})", f"s ({n_b})", f"{n_b} / {n_a}"]
    for col in cols:
        t.add_column(col, justify="left" if col == "attack" else "right")
    for k, v in per_attack.items():
        t.add_row(k, str(v[f"images_{n_a}"]), f"{v[f'seconds_{n_a}']:.2f}", str(v[f"images_{n_b}"]),
                  f"{v[f'seconds_{n_b}']:.2f}", f"{v[f'seconds_{n_b}'] / max(v[f'seconds_{n_a}'], 1e-9):.2f}x")
    t.add_row("defended phase", "", f"{t_fast:.2f}", "", f"{t_slow:.2f}", f"{t_slow / t_fast:.2f}x")
    t.add_row("whole run (+ transfer sets)", "", f"{t_base + t_fast:.2f}", "", f"{t_base + t_slow:.2f}",
              f"{(t_base + t_slow) / (t_base + t_fast):.2f}x")
    Console(stderr=True).print(t)
    ja, jb = fast.to_json(), slow.to_json()
    out = {
        "model": a.model, "n": len(data), "eps": eps, "device": a.device, "compare": a.compare, "runs": [n_a, n_b],
        "budgets": "paper" if a.paper else budgets.kwargs(),
        "survivors_of_transfer": {n: int(transfer_survivors(r).sum()) for n, (r, _) in runs.items()},
        "per_direct_attack": per_attack,
        "base_sets_seconds": round(t_base, 2),
        "defended_seconds": {n_a: round(t_fast, 2), n_b: round(t_slow, 2)},
        "ratio_defended_phase": round(t_slow / t_fast, 3),
        "ratio_whole_run": round((t_base + t_slow) / (t_base + t_fast), 3),
        "worst_case": {n: {k: j[k] for k in ("worst_case", "worst_case_std", "worst_case_majority",
                                            "worst_case_all_draws", "draws", "protocol")}
                       for n, j in ((n_a, ja), (n_b, jb))},
        "images_where_worst_case_differs": (int((fast.worst(True) != slow.worst(True)).any(0).sum())
                                            if a.compare == "skip" else None),
        "base_worst_case": base.to_json()["worst_case"],
        "per_attack_seconds": {n: {k: round(v, 2) for k, v in r.seconds.items()} for n, (r, _) in runs.items()},
        "survivors_attacked": {n: r.survivors_only for n, (r, _) in runs.items()},
        "tables": {n_a: ja, n_b: jb},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "tables"}, indent=1))
    if a.json_out:
        write_results(a.json_out, out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
