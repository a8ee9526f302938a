"""Cost of the IG-Defense forward against the base forward (goal: ≤ 2.05× with smoothing, ≤ 1.1× without).

Real CIFAR-10 ResNet-18 (pyautoattack's ``examples/model_test.pt``), masked at ``layer4`` (N = 512, k = 50),
batch 256, ``torch.no_grad()``. Every configuration runs once per round, rounds interleave the configurations (so
a load spike on a shared machine hits all of them alike), and the table shows the median time over the rounds and
the median of the per-round ratios to the base forward. Also timed: the literal formula with hooks (the naive
method: full forwards, 2 without smoothing, 3 with), the hook fallback, and smoothing with the two passes run
separately instead of batched into one backbone call.

    python benchmarks/bench_defense.py [--batch-size 256] [--rounds 7] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.layers import scaled  # noqa: E402
from igd_cli.models import load_model  # noqa: E402


def literal(model, layer, mask, x, tau, sigma, rs, gen):
    """METHOD.md with plain forwards and a hook: the naive two-pass defence."""
    logits = model(x + torch.randn(x.shape, generator=gen, device=x.device) * sigma) if rs else model(x)
    s = F.softmax(logits / tau, 1) @ mask.float().t()
    with scaled(model, layer, s):
        return model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args()

    import pyautoattack

    dev = torch.device(args.device)
    path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    model = load_model(str(path), arch="resnet18", device=dev).model
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, generator=g).to(dev)
    mask = topk_mask(torch.rand(512, 10, generator=g), args.k).to(dev)
    sigma, tau = 4 / 255, 0.01
    d_off = IGDefense(model, "layer4", mask, rs=False)
    d_on = IGDefense(model, "layer4", mask, sigma=sigma, seed=0, batch_passes=True)
    d_sep = IGDefense(model, "layer4", mask, sigma=sigma, seed=0, batch_passes=False)
    d_hook_off = IGDefense(model, "layer4", mask, rs=False)
    d_hook_off.split.fast = False
    d_hook_on = IGDefense(model, "layer4", mask, sigma=sigma, seed=0)
    d_hook_on.split.fast = False
    gen = torch.Generator(device=dev).manual_seed(0)
    configs = {
        "base forward f(x)": lambda: model(x),
        "IG-Defense, no smoothing (fx split)": lambda: d_off(x),
        "IG-Defense, smoothing, batched passes": lambda: d_on(x),
        "IG-Defense, smoothing, separate passes": lambda: d_sep(x),
        "IG-Defense, no smoothing (hook fallback)": lambda: d_hook_off(x),
        "IG-Defense, smoothing (hook fallback)": lambda: d_hook_on(x),
        "naive literal formula, no smoothing": lambda: literal(model, "layer4", mask, x, tau, sigma, False, gen),
        "naive literal formula, smoothing": lambda: literal(model, "layer4", mask, x, tau, sigma, True, gen),
    }
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in configs}
    with torch.no_grad():
        for fn in configs.values():  # warm-up (fx check, allocator, oneDNN/cuDNN kernels)
            fn()
        sync()
        for _ in range(args.rounds):
            for name, fn in configs.items():
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    base = times["base forward f(x)"]
    rows = []
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        rows.append({"configuration": name, "median_s": statistics.median(ts),
                     "ratio_of_medians": statistics.median(ts) / statistics.median(base),
                     "median_ratio": statistics.median(ratios)})
    goals = {"IG-Defense, smoothing, batched passes": 2.05, "IG-Defense, no smoothing (fx split)": 1.1}
    info = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "batch_size": args.batch_size, "rounds": args.rounds,
            "k": args.k, "layer": "layer4", "model": "pyautoattack examples/model_test.pt (ResNet-18, CIFAR-10)"}
    if args.json:
        print(json.dumps({"info": info, "rows": rows, "goals": goals}))
        return
    from rich.console import Console

    from igd_cli.report import timing_table

    out_console = Console(width=150)

    table_rows = [{"configuration": r["configuration"], "median s": f"{r['median_s']:.3f}",
                   "× base (median of ratios)": f"{r['median_ratio']:.3f}",
                   "× base (ratio of medians)": f"{r['ratio_of_medians']:.3f}",
                   "goal": f"≤ {goals[r['configuration']]}" if r["configuration"] in goals else ""} for r in rows]
    out_console.print(timing_table(f"IG-Defense forward cost, batch {args.batch_size}, {dev}, "
                                   f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds",
                                   table_rows, list(table_rows[0])))
    out_console.print(json.dumps(info))


if __name__ == "__main__":
    main()
