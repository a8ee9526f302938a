"""``igd calibrate-k``: choose k by binary search on defended clean accuracy and write the mask artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ..calibrate import DEFAULT_CACHE_BYTES, calibrate_k, load_importance
from ..cli import app, emit
from ..common import open_target, parse_eps
from ..console import out_console
from ..defense import DEFAULT_N_SMOOTH, DEFAULT_TAU, IGDefense, check_settings, save_mask, topk_mask
from ..errors import IgdError
from ..options import Arch, BatchSize, DataDir, Dataset, Device, Eps, Json, Layer, Model, Seed, ThreatModel
from ..report import calibration_table, plot_calibration

DEFAULT_N_EXAMPLES = 1000


@app.command("calibrate-k")
def calibrate_cmd(
    importance: Annotated[Path, typer.Option("--importance", help="importance artifact from igd rank (or igd merge)")],
    out: Annotated[Path, typer.Option("--out", help="where to write the mask artifact (safetensors)")],
    model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf", layer: Layer = None,
    split: Annotated[str, typer.Option("--split", help="data split to calibrate on")] = "test",
    n_examples: Annotated[Optional[int], typer.Option(
        "--n-examples", help=f"the first N images of the split (default {DEFAULT_N_EXAMPLES}, or all if fewer)")] = None,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="allowed clean-accuracy drop below the base model, in percentage points")] = 0.5,
    eps: Eps = None,
    sigma: Annotated[Optional[float], typer.Option("--sigma", help="smoothing noise std (default ε/2)")] = None,
    n_smooth: Annotated[int, typer.Option("--n-smooth", help="noise samples for the soft pseudo-label")] = DEFAULT_N_SMOOTH,
    tau: Annotated[float, typer.Option("--tau", help="softmax temperature of the soft pseudo-label")] = DEFAULT_TAU,
    no_rs: Annotated[bool, typer.Option("--no-rs", help="no randomized smoothing: ŷ = softmax(f(x)/τ)")] = False,
    k: Annotated[Optional[int], typer.Option("--k", help="skip the search: write the mask for this k")] = None,
    batch_size: BatchSize = 256, seed: Seed = 0, device: Device = "auto",
    cache_mb: Annotated[int, typer.Option(
        "--cache-mb", help="memory for cached k-independent features; batches beyond are recomputed per k")
    ] = DEFAULT_CACHE_BYTES >> 20,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG: clean accuracy vs k with the tolerance band")] = None,
    as_json: Json = False,
) -> None:
    """Find the smallest k whose defended clean accuracy is at least the base clean accuracy minus --tolerance
    points, by binary search over k in [1, N], and write the top-k-per-class mask.

    The result is the boundary the search found: clean accuracy at k passes and at k-1 fails. Clean accuracy is
    not always monotone in k, so a smaller passing k may exist below a failing one. The smoothing pass and the
    layer's clean features do not depend on k: they are computed once (seeded noise, same seed -> same k) and each
    candidate k only runs the rest of the network.
    """
    if tolerance < 0:
        raise IgdError(f"--tolerance {tolerance}: must be >= 0 percentage points")
    rs = not no_rs
    target = open_target(model, arch, dataset, threat_model, device)
    eps_value = parse_eps(eps)
    if rs and sigma is None:
        eps_value = eps_value if eps_value is not None else target.default_eps()
        sigma = eps_value / 2
    check_settings(tau=tau, sigma=sigma, n_smooth=n_smooth, rs=rs)
    if n_examples is not None and n_examples < 1:
        raise IgdError(f"--n-examples {n_examples}: must be at least 1")
    data = target.data(split, None, data_dir)
    if n_examples is not None and n_examples > len(data):
        raise IgdError(f"--dataset {data.name} ({split}) has {len(data)} images, fewer than the {n_examples} asked for")
    data.n = n_examples if n_examples is not None else min(DEFAULT_N_EXAMPLES, len(data))
    if target.loaded.num_classes != data.num_classes:
        raise IgdError(f"--dataset {data.name} has {data.num_classes} classes but the model predicts "
                       f"{target.loaded.num_classes}")
    input_shape = tuple(data.get(0, 1).x.shape[1:])
    art, layer_name, imp = load_importance(importance, target, layer, input_shape)
    n_neurons = imp.shape[0]
    if k is not None and not 1 <= k <= n_neurons:
        raise IgdError(f"--k {k}: must be between 1 and N = {n_neurons} (the masked layer's neuron count)")

    full_mask = torch.ones(n_neurons, target.loaded.num_classes)
    defense = IGDefense(target.model, layer_name, full_mask.to(target.device), tau=tau, sigma=sigma,
                        n_smooth=n_smooth, rs=rs, seed=seed)
    cal = calibrate_k(defense, imp, data, tolerance=tolerance, batch_size=batch_size, k=k,
                      max_cache_bytes=cache_mb << 20)
    mask = topk_mask(imp, cal.k)
    settings = {**defense.settings(), "eps": eps_value}
    calibration = {"tolerance": tolerance, "n_examples": cal.n_examples, "split": split, "seed": seed,
                   "batch_size": batch_size, "base_clean_accuracy": cal.base_accuracy,
                   "clean_accuracy": cal.accuracy, "curve": cal.curve, "searched": cal.searched,
                   "data": {"dataset": data.name, "split": split, "n": cal.n_examples}}
    save_mask(out, target, layer_name, mask, k=cal.k, importance_path=importance, importance_meta=art.meta,
              defense=settings, extra={"calibration": calibration, "seconds": cal.seconds})
    result = {"k": cal.k, "base_clean_accuracy": cal.base_accuracy, "clean_accuracy": cal.accuracy,
              "curve": cal.curve, "out": str(out), "seconds": cal.seconds,
              "n_neurons": n_neurons, "n_examples": cal.n_examples, "tolerance": tolerance, "layer": layer_name,
              "searched": cal.searched, "order": cal.order, "defense": settings, **cal.info}
    if plot is not None:
        plot_calibration(plot, cal.curve, cal.base_accuracy, tolerance, cal.k, n_neurons,
                         title=f"{target.loaded.name.split('/')[-1]} · {layer_name} · {art.meta.get('method', '?')} "
                               f"· {cal.n_examples} images")
        result["plot"] = str(plot)
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    out_console.print(calibration_table(r))
    out_console.print(f"k = [bold]{r['k']}[/bold] of N = {r['n_neurons']} at layer {r['layer']}: clean accuracy "
                      f"{100 * r['clean_accuracy']:.2f}% (base {100 * r['base_clean_accuracy']:.2f}%), "
                      f"{r['seconds']:.1f} s -> {r['out']}" + (f", plot {r['plot']}" if "plot" in r else ""))
