"""``igd calibrate-k``: choose k by binary search on defended clean accuracy and write the mask artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..calibrate import DEFAULT_CACHE_BYTES, DEFAULT_N_EXAMPLES, parse_k, run_calibration
from ..cli import app, emit, examples
from ..common import open_target, parse_eps
from ..console import out_console
from ..defense import DEFAULT_N_SMOOTH, DEFAULT_TAU
from ..batching import parse_batch_size
from ..options import (Arch, AutoBatchSize, CalibrationEps, DataDir, Dataset, Device, Json, Layer, Model, NSmooth,
                       Normalize, Numerics, Precision, Seed, Sigma, Tau, ThreatModel, ZooDataset)
from ..precision import check_precision
from ..report import calibration_table


@app.command("calibrate-k", short_help="choose k on clean accuracy and write the mask", epilog=examples(
    "igd calibrate-k --model demo --importance imp.safetensors --n-examples 200 --out mask.safetensors",
    "igd calibrate-k --model demo --importance imp.safetensors --k 16 --n-examples 200 --plot k.png --out mask-k16.safetensors"))
def calibrate_cmd(
    importance: Annotated[list[Path], typer.Option(
        "--importance", metavar="FILE", help="importance artifact from igd rank (or igd merge); repeat it (one per layer) to mask "
                             "several layers with one mask artifact")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="where to write the mask artifact (safetensors)")],
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    normalize: Normalize = None,
    threat_model: ThreatModel = "Linf", layer: Layer = None,
    zoo_dataset: ZooDataset = None,
    split: Annotated[str, typer.Option("--split", metavar="train|test", help="data split to calibrate on")] = "test",
    n_examples: Annotated[Optional[int], typer.Option(
        "--n-examples", metavar="N", min=1, help=f"N images of the split from --start (default: {DEFAULT_N_EXAMPLES}, or all there are)")] = None,
    start: Annotated[int, typer.Option(
        "--start", metavar="A", min=0, help="calibrate on images A, A+1, ... of the split: hold out the first A, e.g. the "
                                            "images you evaluate on, so that k is not tuned on them")] = 0,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", metavar="PTS", help="allowed clean-accuracy drop below the base model, in percentage points")] = 0.5,
    eps: CalibrationEps = None,
    sigma: Sigma = None, n_smooth: NSmooth = DEFAULT_N_SMOOTH, tau: Tau = DEFAULT_TAU,
    no_rs: Annotated[bool, typer.Option("--no-rs", help="no randomized smoothing: ŷ = softmax(f(x)/τ)")] = False,
    k: Annotated[Optional[list[str]], typer.Option(
        "--k", metavar="K|LAYER=K", help="skip the search: write the mask for this k; several layers: LAYER=K fixes that layer's k "
                    "(repeatable; the others keep searching the same fraction k/N)")] = None,
    batch_size: AutoBatchSize = "128", precision: Precision = "fp32", seed: Seed = 0, device: Device = "auto",
    numerics: Numerics = "pinned",
    cache_mb: Annotated[int, typer.Option(
        "--cache-mb", metavar="MB", help="memory for cached k-independent features; batches beyond are recomputed per k")
    ] = DEFAULT_CACHE_BYTES >> 20,
    plot: Annotated[Optional[Path], typer.Option("--plot", metavar="PNG", help="PNG: clean accuracy vs k with the tolerance band")] = None,
    as_json: Json = False,
) -> None:
    """Find the smallest k whose defended clean accuracy is at least the base clean accuracy minus --tolerance
    points, by binary search over k in [1, N], and write the top-k-per-class mask. Several --importance files (one
    per layer) write one mask artifact masking every layer; by default all keep the same fraction k/N.

    The result is the boundary the search found: clean accuracy at k passes and at k-1 fails. Clean accuracy is
    not always monotone in k, so a smaller passing k may exist below a failing one. The smoothing pass and the
    layer's clean features do not depend on k: they are computed once (seeded noise, same seed -> same k) and each
    candidate k only runs the rest of the network.
    """
    check_precision(precision)
    parse_batch_size(batch_size)
    target = open_target(model, arch, dataset, threat_model, device, zoo_dataset, normalize=normalize,
                         numerics=numerics)
    check_precision(precision, target.device)
    result = run_calibration(target, list(importance), out, layer=layer, split=split, n_examples=n_examples, start=start,
                             tolerance=tolerance, eps=parse_eps(eps), sigma=sigma, n_smooth=n_smooth, tau=tau,
                             rs=not no_rs, k=parse_k(k), batch_size=parse_batch_size(batch_size), precision=precision,
                             seed=seed, cache_bytes=cache_mb << 20,
                             data_dir=data_dir, plot=plot)
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    out_console.print(calibration_table(r))
    where = (f"k = [bold]{r['k']}[/bold] of N = {r['n_neurons']} at layer {r['layer']}" if isinstance(r["k"], int)
             else "k = " + ", ".join(f"[bold]{r['k'][name]}[/bold] of {r['n_neurons'][name]} at {name}"
                                     for name in r["layers"]))
    out_console.print(f"{where}: clean accuracy "
                      f"{100 * r['clean_accuracy']:.2f}% (base {100 * r['base_clean_accuracy']:.2f}%), "
                      f"{r['seconds']:.1f} s -> {r['out']}" + (f", plot {r['plot']}" if "plot" in r else ""))
