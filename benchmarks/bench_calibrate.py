"""Cost of calibrate-k against one defended clean-accuracy pass over the same images (goal: ≤ 3×).

Real CIFAR-10 ResNet-18 (pyautoattack's ``examples/model_test.pt``) at ``layer4`` (N = 512), images from
``cifar10-test-846.safetensors`` in ``--data-dir`` when present (default ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``;
random CIFAR-shaped images otherwise), smoothing on
(σ = 4/255). Three timings, each the median over ``--repeats`` runs:

- one defended clean-accuracy pass (the first noise draw, as calibrate-k scores it);
- ``calibrate_k`` (features once, then the tail for every k the binary search visits);
- the naive calibration: the same binary search with a full defended pass for every candidate k, measured
  (``--naive-repeats``, default 1, since it is slow).

    python benchmarks/bench_calibrate.py [--n-examples 512] [--batch-size 256] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igd_cli.calibrate import calibrate_k, passes  # noqa: E402
from igd_cli.data import ImageSet, load_dataset  # noqa: E402
from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.devices import module_device  # noqa: E402
from igd_cli.models import load_model  # noqa: E402
from igd_cli.scoring import classify  # noqa: E402

from _data import add_data_dir, find_data_file  # noqa: E402

TEST_FILE = "cifar10-test-846.safetensors"


def clean_pass(defense: IGDefense, data: ImageSet, batch_size: int, seed: int = 0) -> int:
    """One defended clean-accuracy pass (the first noise draw, which calibrate-k and ``defend-eval`` draw 0 use):
    the number of correct defended predictions."""
    b = data.all()
    return int(classify(defense, b.x, b.y, 1, seed=seed, batch_size=batch_size).sum())


def naive_calibration(model, imp, data: ImageSet, batch_size: int, tolerance: float, seed: int) -> tuple[int, int]:
    """Binary search where every candidate k is a full defended clean-accuracy pass (clean_pass)."""
    n_neurons = imp.shape[0]
    evals = 0

    def run(k: int):
        nonlocal evals
        evals += 1
        d = IGDefense(model, "layer4", topk_mask(imp, k).to(module_device(model)), sigma=4 / 255, seed=seed)
        return clean_pass(d, data, batch_size, seed)

    b = data.all()
    base = int(classify(model, b.x, b.y, 1, batch_size=batch_size).sum())
    run(n_neurons)
    lo, hi = 1, n_neurons
    while lo < hi:
        mid = (lo + hi) // 2
        c = run(mid)
        if passes(c, base, len(data), tolerance):
            hi = mid
        else:
            lo = mid + 1
    return hi, evals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--importance", help="importance artifact for the model (default: seeded random)")
    ap.add_argument("--json", action="store_true")
    add_data_dir(ap)
    args = ap.parse_args()

    import os

    import pyautoattack

    os.environ.setdefault("IGD_NO_PROGRESS", "1")
    dev = torch.device(args.device)
    model = load_model(str(Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"), arch="resnet18",
                       device=dev).model
    real = find_data_file(TEST_FILE, args.data_dir)
    if real is not None:
        data = load_dataset(str(real), "test", args.n_examples)
        source = real.name
    else:
        g = torch.Generator().manual_seed(0)
        xs = torch.rand(args.n_examples, 3, 32, 32, generator=g)
        ys = torch.randint(0, 10, (args.n_examples,), generator=g)
        data = ImageSet("random", "test", [str(i) for i in range(10)], args.n_examples, lambda i, j: (xs[i:j], ys[i:j]))
        source = f"random images ({TEST_FILE} absent)"
    if args.importance:
        from igd_cli.artifacts import load_artifact

        imp = load_artifact(args.importance, kind="importance")["importance"].float()
    else:
        imp = torch.rand(512, 10, generator=torch.Generator().manual_seed(0))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    d = IGDefense(model, "layer4", torch.ones(512, 10, device=dev), sigma=4 / 255, seed=0)
    d_k = IGDefense(model, "layer4", topk_mask(imp, 50).to(dev), sigma=4 / 255, seed=0)
    with torch.no_grad():
        clean_pass(d_k, data.__class__("w", "test", data.classes, min(8, len(data)), data._get), 8)  # warm-up
    t_pass, t_cal, cal = [], [], None
    for _ in range(args.repeats):  # interleaved
        t_pass.append(timed(lambda: clean_pass(d_k, data, args.batch_size))[0])
        dt, cal = timed(lambda: calibrate_k(d, imp, data, batch_size=args.batch_size))
        t_cal.append(dt)
    t_naive, naive = [], None
    for _ in range(args.naive_repeats):
        dt, naive = timed(lambda: naive_calibration(model, imp, data, args.batch_size, 0.5, 0))
        t_naive.append(dt)
    p, c = statistics.median(t_pass), statistics.median(t_cal)
    nv = statistics.median(t_naive) if t_naive else None
    res = {"n_examples": len(data), "data": source, "device": str(dev), "threads": torch.get_num_threads(),
           "k": cal.k, "k_evaluated": len(cal.order), "naive_k": naive[0] if naive else None,
           "defended_pass_s": p, "calibrate_s": c, "naive_s": nv, "calibrate_over_pass": c / p,
           "naive_over_pass": nv / p if nv else None, "repeats": args.repeats}
    if args.json:
        print(json.dumps(res))
        return
    from rich.console import Console

    from igd_cli.report import timing_table

    rows = [{"what": "one defended clean-accuracy pass (defend-eval --attack none)", "median s": f"{p:.2f}",
             "× pass": "1.00", "goal": ""},
            {"what": f"calibrate-k (cached features, {len(cal.order)} k evaluated)", "median s": f"{c:.2f}",
             "× pass": f"{c / p:.2f}", "goal": "≤ 3"}]
    if nv is not None:
        rows.append({"what": f"naive calibration (full defended pass per k, {naive[1]} passes)",
                     "median s": f"{nv:.2f}", "× pass": f"{nv / p:.2f}", "goal": ""})
    con = Console(width=140)
    con.print(timing_table(f"calibrate-k cost: ResNet-18 layer4, {len(data)} images ({source}), batch "
                           f"{args.batch_size}, {dev}, {torch.get_num_threads()} threads", rows, list(rows[0])))
    con.print(f"k = {cal.k} (naive search: {res['naive_k']}); median of {args.repeats} interleaved runs "
              f"({args.naive_repeats} for the naive search)")


if __name__ == "__main__":
    main()
