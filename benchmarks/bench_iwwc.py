"""IW-WC with skipping (attacks on the defended model run only on images no earlier attack broke) against
without skipping (every attack on every image), measured in the same run on the same defended model.

The six base-model (transfer) sets are computed once, timed apart, and shared by both runs, as in real use
(they are reused by every defence of a base model). Prints both worst cases, the images on which they differ,
the time of the defended-model phase of each run and the ratio.

    python benchmarks/bench_iwwc.py                       # demo model, 100 images, reduced budgets
    python benchmarks/bench_iwwc.py --paper --n 450       # the paper's budgets
    python benchmarks/bench_iwwc.py --mask MASK.safetensors --device cuda
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igd_cli.artifacts import save_artifact  # noqa: E402
from igd_cli.common import open_target  # noqa: E402
from igd_cli.defense import load_defense  # noqa: E402
from igd_cli.evaluate import Budgets, defense_identity, evaluate_defense, render_table  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--mask", type=Path, default=None)
    ap.add_argument("--k", type=int, default=40, help="neurons kept per class in the random mask")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--paper", action="store_true", help="the paper's budgets (slow on CPU)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--eot-iter", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=None)
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
    common = dict(attack="iw-wc", budgets=budgets, seed=0, batch_size=a.batch_size, defense_meta=ident,
                  show_progress=False)

    t = time.perf_counter()
    base = evaluate_defense(target, None, data, workdir=tmp / "base", **common)
    t_base = time.perf_counter() - t
    runs = {}
    for name, skip in (("skip", True), ("no-skip", False)):
        work = tmp / name
        shutil.copytree(tmp / "base", work)
        d = load_defense(target, mask, seed=0)
        t = time.perf_counter()
        res = evaluate_defense(target, d, data, workdir=work, skip=skip, **common)
        runs[name] = (res, time.perf_counter() - t)

    (fast, t_fast), (slow, t_slow) = runs["skip"], runs["no-skip"]
    differ = int((fast.worst(True) != slow.worst(True)).sum())
    render_table(fast, title=f"IW-WC with skipping, {a.model}, {len(data)} images")
    render_table(slow, title=f"IW-WC without skipping, {a.model}, {len(data)} images")
    out = {
        "model": a.model, "n": len(data), "device": a.device, "budgets": "paper" if a.paper else budgets.kwargs(),
        "base_sets_seconds": round(t_base, 2),
        "defended_seconds_skip": round(t_fast, 2), "defended_seconds_no_skip": round(t_slow, 2),
        "speedup_defended_phase": round(t_slow / t_fast, 2),
        "speedup_total": round((t_base + t_slow) / (t_base + t_fast), 2),
        "worst_case_skip": fast.to_json()["worst_case"], "worst_case_no_skip": slow.to_json()["worst_case"],
        "images_where_worst_case_differs": differ,
        "base_worst_case": base.to_json()["worst_case"],
        "per_attack_seconds_skip": {k: round(v, 2) for k, v in fast.seconds.items()},
        "per_attack_seconds_no_skip": {k: round(v, 2) for k, v in slow.seconds.items()},
        "survivors_attacked": fast.survivors_only,
        "table_skip": fast.to_json(),
    }
    print(json.dumps({k: v for k, v in out.items() if k != "table_skip"}, indent=1))
    if a.json_out:
        a.json_out.write_text(json.dumps(out, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
