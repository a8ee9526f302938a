"""LO-IR: fast paths against the literal algorithm, same process, real CIFAR-10 ResNet-18.

    python benchmarks/bench_lo_ir.py [--n-probe 256] [--naive-neurons 2] [--check-probe 20] [--layers layer4 layer3]

Timing: the literal algorithm (one full forward of the probe set per neuron) is timed on ``--naive-neurons``
neurons and scaled per neuron to all N (plus its one base pass); the fast path runs on all N. Exactness: the
timed literal rows against the fast rows (max abs diff), and, on ``--check-probe`` images, the full literal
matrix against the fast one (max abs diff, top-50 set agreement per class). Needs ``cifar10-train-4660.safetensors``
in ``--data-dir`` (default ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

os.environ.setdefault("IGD_NO_PROGRESS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _data import add_data_dir, data_file  # noqa: E402


def top_agreement(fast: torch.Tensor, ref: torch.Tensor, k: int, tie: float = 1e-5) -> float:
    """Worst class: share of the fast top-k neurons that are in the literal top-k (a neuron whose literal value
    ties the k-th largest within ``tie`` counts as in). Classes whose column is all zero (no probe) are skipped."""
    worst = 1.0
    for c in range(ref.shape[1]):
        if float(ref[:, c].abs().max()) == 0.0:
            continue
        kth = torch.topk(ref[:, c], k).values[-1]
        picked = torch.topk(fast[:, c], k).indices
        worst = min(worst, float((ref[picked, c] >= kth - tie).float().mean()))
    return worst


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-probe", type=int, default=256)
    ap.add_argument("--naive-neurons", type=int, default=2)
    ap.add_argument("--check-probe", type=int, default=20, help="probe images for the full literal top-50 check (0: skip)")
    ap.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    add_data_dir(ap)
    args = ap.parse_args()
    data_path = data_file("cifar10-train-4660.safetensors", args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    import pyautoattack

    from igd_cli.data import load_dataset
    from igd_cli.models import load_model
    from igd_cli.ranking.lo_ir import lo_ir, lo_ir_naive

    model = load_model(str(Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"), arch="resnet18").model
    data = load_dataset(str(data_path), "train", args.n_probe)
    console = Console(width=170)
    rows = []
    for layer in args.layers:
        # warm-up so that neither side pays first-call costs
        lo_ir(model, layer, load_dataset(str(data_path), "train", 8), 10, neurons=(0, 2), show_progress=False)
        k = args.naive_neurons
        # the literal's one base pass (it is part of its cost once), then k neurons
        def base_pass():
            with torch.no_grad():
                for b in data.batches(args.batch_size):
                    model(b.x)
        _, t_base = timed(base_pass)
        naive, t_naive_k = timed(lambda: lo_ir_naive(model, layer, data, 10, neurons=(0, k),
                                                     batch_size=args.batch_size, show_progress=False))
        fast, t_fast = timed(lambda: lo_ir(model, layer, data, 10, batch_size=args.batch_size, show_progress=False))
        n = fast.importance.shape[0]
        per_neuron = max(t_naive_k - t_base, 1e-9) / k
        t_naive_full = t_base + n * per_neuron
        diff_rows = float((fast.importance[:k] - naive.importance).abs().max())
        check_diff, agree = None, None
        if args.check_probe:
            small = load_dataset(str(data_path), "train", args.check_probe)
            ref = lo_ir_naive(model, layer, small, 10, batch_size=args.batch_size, show_progress=False)
            got = lo_ir(model, layer, small, 10, batch_size=args.batch_size, show_progress=False)
            check_diff = float((ref.importance - got.importance).abs().max())
            agree = top_agreement(got.importance, ref.importance, min(50, n))
        rows.append((layer, n, fast.path, t_fast, per_neuron, t_naive_full, t_naive_full / t_fast, diff_rows,
                     check_diff, agree))
        console.print(f"[dim]{layer}: literal {k} neurons {t_naive_k:.1f} s (base pass {t_base:.1f} s), "
                      f"fast {t_fast:.1f} s[/dim]", highlight=False)
    t = Table(title=f"LO-IR on the CIFAR-10 ResNet-18 (model_test.pt), {args.n_probe} probe images of "
                    f"cifar10-train-4660, batch {args.batch_size}, CPU ({torch.get_num_threads()} threads, shared)")
    for col in ("layer", "N", "fast path", "fast s", "literal s/neuron", "literal s (all N)", "speed-up",
                f"max|Δ| {args.naive_neurons} rows", f"max|Δ| all, {args.check_probe} img", "top-50 agree"):
        t.add_column(col, justify="right")
    for layer, n, path, tf, pn, tn, ratio, d1, d2, ag in rows:
        t.add_row(layer, str(n), path, f"{tf:.1f}", f"{pn:.2f}", f"{tn:.0f}", f"{ratio:.0f}×", f"{d1:.1e}",
                  "-" if d2 is None else f"{d2:.1e}", "-" if ag is None else f"{ag:.0%}")
    console.print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
