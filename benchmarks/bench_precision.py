"""Reduced-precision LO-IR against fp32: top-k agreement of the rankings, on the real CIFAR-10 ResNet-18.

    python benchmarks/bench_precision.py [--layers layer4 layer3] [--n-probe 40] [--precision bf16] [--neurons N]
                                         [--logit-rounding] [--device cpu] [--out FILE.json]

Per layer: igd's fp32 LO-IR (the reference; tests/test_precision.py shows it equals the literal ablation) against
igd's LO-IR in ``--precision``, as the top-k Jaccard index per class at k = N/10, N/4, N/2 (mean and worst over
classes and k), the share of exactly-zero entries, and the seconds of each. ``--logit-rounding`` also measures what
rounding both logits of every difference to the reduced precision gives (the whole forward under autocast, the
batched tail as igd ran it before it took the differences in fp32): what igd would rank without that. Needs
``cifar10-train-4660.safetensors`` in ``--data-dir`` (default ``$IGD_DATA_DIR``, else ``$IGD_HOME/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("IGD_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _data import add_data_dir, command_line, data_file, write_results  # noqa: E402
from igd_cli.layers import LayerSplit  # noqa: E402
from igd_cli.precision import autocast  # noqa: E402
from igd_cli.ranking.lo_ir import lo_ir  # noqa: E402

#: fractions of N whose top-k sets are compared (as tests/test_precision.py)
KS = (0.1, 0.25, 0.5)


def topk_agreement(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    """Per class and k in :data:`KS`, the Jaccard index of the top-k neuron sets of two (N, C) importances:
    mean, worst, and the mean per k."""
    n = ref.shape[0]
    per_k = {}
    for f in KS:
        k = max(1, round(f * n))
        js = []
        for c in range(ref.shape[1]):
            a, b = set(ref[:, c].topk(k).indices.tolist()), set(got[:, c].topk(k).indices.tolist())
            js.append(len(a & b) / len(a | b))
        per_k[k] = js
    every = [j for js in per_k.values() for j in js]
    return {"mean": round(sum(every) / len(every), 4), "worst": round(min(every), 4),
            "mean_per_k": {str(k): round(sum(js) / len(js), 4) for k, js in per_k.items()}}


def rounded_logit_lo_ir(model: torch.nn.Module, layer: str, data: Any, num_classes: int, precision: str,
                        neurons: tuple[int, int], batch_size: int = 128, chunk: int = 16) -> torch.Tensor:
    """LO-IR rows ``neurons`` with the whole forward under autocast, both logits of every difference rounded to
    ``precision`` (the batched tail without igd's fp32 tail): written here, for comparison only."""
    split = LayerSplit(model, layer)
    device = next(model.parameters()).device
    a0, b0 = neurons
    sums = torch.zeros(b0 - a0, num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    with torch.no_grad(), autocast(precision, device):
        for batch in data.batches(batch_size):
            x, y = batch.x.to(device), batch.y.to(device)
            a, ctx = split.head(x)
            base = split.tail(a, ctx).float().gather(1, y[:, None])[:, 0]
            onehot = torch.nn.functional.one_hot(y, num_classes).double()
            counts += onehot.sum(0).cpu()
            for j0 in range(a0, b0, chunk):
                r = min(chunk, b0 - j0)
                rep = a.unsqueeze(1).repeat(1, r, *([1] * (a.ndim - 1)))
                rep[:, torch.arange(r, device=device), torch.arange(j0, j0 + r, device=device)] = 0
                logits = split.tail(rep.reshape(len(x) * r, *a.shape[1:]), LayerSplit.repeat_ctx(ctx, r)).float()
                gt = logits.reshape(len(x), r, -1).gather(2, y[:, None, None].expand(len(x), r, 1))[..., 0]
                sums[j0 - a0:j0 - a0 + r] += ((base[:, None] - gt).abs().double().T @ onehot).cpu()
    return (sums / counts.clamp(min=1)).float()


def compare(model: torch.nn.Module, layer: str, data: Any, num_classes: int, precision: str, *,
            neurons: tuple[int, int] | None = None, batch_size: int = 128, logit_rounding: bool = False,
            reference: torch.Tensor | None = None, path: str = "auto") -> dict[str, Any]:
    """igd's ``precision`` LO-IR at ``layer`` (``path``: igd's choice, or forced) against its fp32 one (or
    ``reference``): agreement, zero entries, seconds; with ``logit_rounding`` the same for
    :func:`rounded_logit_lo_ir`."""
    def run(p: str) -> tuple[Any, float]:
        t0 = time.perf_counter()
        res = lo_ir(model, layer, data, num_classes, neurons=neurons, batch_size=batch_size, show_progress=False,
                    precision=p, path=path)
        return res, time.perf_counter() - t0

    out: dict[str, Any] = {"layer": layer, "precision": precision, "n_probe": len(data)}
    if reference is None:
        ref, out["fp32_seconds"] = run("fp32")
        reference = ref.importance
        out["path"] = ref.path
    got, out["seconds"] = run(precision)
    out["path"] = got.path
    out["neurons"] = list(got.neurons)
    out["agreement"] = topk_agreement(reference, got.importance)
    out["zero_share"] = round(float((got.importance == 0).float().mean()), 5)
    out["fp32_zero_share"] = round(float((reference == 0).float().mean()), 5)
    if logit_rounding:
        t0 = time.perf_counter()
        rounded = rounded_logit_lo_ir(model, layer, data, num_classes, precision, tuple(got.neurons), batch_size)
        out["logit_rounding"] = {"agreement": topk_agreement(reference, rounded),
                                 "zero_share": round(float((rounded == 0).float().mean()), 5),
                                 "seconds": round(time.perf_counter() - t0, 2)}
    for key in ("seconds", "fp32_seconds"):
        if key in out:
            out[key] = round(out[key], 2)
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (the docs' examples are parsed with it: tests)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", default=["layer4", "layer3"])
    ap.add_argument("--n-probe", type=int, default=40, help="probe images (the first of the training file)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--neurons", type=int, default=None, help="rank neurons 0..N-1 only (default all)")
    ap.add_argument("--logit-rounding", action="store_true",
                    help="also measure the ranking from two reduced-precision logits (slow where the CPU emulates bf16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="results JSON to write")
    add_data_dir(ap)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    import pyautoattack

    from igd_cli.data import load_dataset
    from igd_cli.models import load_model

    path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    model = load_model(str(path), arch="resnet18", device=args.device).model
    probe = load_dataset(str(data_file("cifar10-train-4660.safetensors", args.data_dir)), "train", args.n_probe)
    rows = []
    for layer in args.layers:
        neurons = None if args.neurons is None else (0, args.neurons)
        rows.append(compare(model, layer, probe, 10, args.precision, neurons=neurons, batch_size=args.batch_size,
                            logit_rounding=args.logit_rounding))
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": command_line("bench_precision.py", argv),
              "model": "pyautoattack examples/model_test.pt (CIFAR-10 ResNet-18, standard training)",
              "probe": f"the first {len(probe)} images of cifar10-train-4660.safetensors", "device": args.device,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "reference": "igd's fp32 LO-IR",
              "ks": [f"N*{f}" for f in KS], "layers": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result = write_results(args.out, result, args.data_dir)
    return result


if __name__ == "__main__":
    main()
