"""``igd rank``: class-wise neuron importance at the masked layer (LO-IR, CD-IR or random), whole or a shard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import app, emit, examples
from ..common import check_classes, open_target, resolve_model_layer
from ..data import load_dataset
from ..errors import IgdError
from ..console import out_console, progress_enabled
from ..batching import choose_batch_size, parse_batch_size, rank_trial
from ..options import (Arch, AutoBatchSize, DataDir, Dataset, Device, Json, Layer, Model, Normalize, Numerics, Precision, ProbeDataset, Seed,
                       ThreatModel, ZooDataset)
from ..precision import check_precision
from ..ranking.lo_ir import check_naive_precision
from ..ranking import METHODS, RankRequest, get_method, rank
from ..ranking.cd_ir import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, DEFAULT_TEMPLATE
from ..shards import parse_neurons


#: the default --batch-size
RANK_BATCH = 128


@app.command("rank", short_help="class-wise neuron importance of one layer (N, C)", epilog=examples(
    "igd rank --model demo --n-probe 200 --out imp.safetensors",
    "igd rank --model demo --n-probe 200 --neurons 0:64 --out imp-0.safetensors"))
def rank_cmd(
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="importance artifact to write (a shard with --neurons)")],
    model: Model = "demo",
    arch: Arch = None,
    normalize: Normalize = None,
    dataset: Dataset = None,
    data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf",
    zoo_dataset: ZooDataset = None,
    probe_dataset: ProbeDataset = None,
    split: Annotated[str, typer.Option("--split", metavar="train|test", help="probe images from train (default) or test (a "
                                       "PATH.safetensors has no splits: all its images)")] = "train",
    layer: Layer = None,
    method: Annotated[str, typer.Option("--method", metavar="lo-ir|cd-ir|random", help=" | ".join(METHODS))] = "lo-ir",
    n_probe: Annotated[Optional[int], typer.Option("--n-probe", metavar="N", min=1, help="first N images of the split (default: all)")] = None,
    neurons: Annotated[Optional[str], typer.Option("--neurons", metavar="A:B", help="A:B computes rows A..B-1 only (a shard for igd merge)")] = None,
    clip_model: Annotated[str, typer.Option("--clip-model", metavar="NAME", help="open_clip model name (cd-ir)")] = DEFAULT_CLIP_MODEL,
    clip_pretrained: Annotated[str, typer.Option("--clip-pretrained", metavar="TAG|PATH", help="open_clip weights tag, a local checkpoint PATH, or none (untrained)")] = DEFAULT_CLIP_PRETRAINED,
    clip_cache: Annotated[Optional[Path], typer.Option("--clip-cache", metavar="FILE", help="CLIP embeddings cache, written or reused when it matches (default: under $IGD_HOME/clip-cache)")] = None,
    clip_template: Annotated[str, typer.Option("--clip-template", metavar="TEXT", help="text prompt per class, {} = class name (CLIP-Dissect: the bare name)")] = DEFAULT_TEMPLATE,
    batch_size: AutoBatchSize = "128",
    precision: Precision = "fp32",
    seed: Seed = 0,
    device: Device = "auto",
    numerics: Numerics = "pinned",
    exact_naive: Annotated[bool, typer.Option("--exact-naive", help="lo-ir: the literal algorithm (one pass per neuron), the reference")] = False,
    force: Annotated[bool, typer.Option("--force", help="recompute even when --out already holds this result")] = False,
    as_json: Json = False,
) -> None:
    """Rank the masked layer's neurons per class; writes tensor importance (N, C), larger = more important."""
    t0 = time.perf_counter()
    if out.is_dir():
        raise IgdError(f"--out {out}: is a directory, expected the importance file to write")
    m = get_method(method)
    check_precision(precision)
    if exact_naive and m.name == "lo-ir":
        check_naive_precision(precision)
    parse_batch_size(batch_size)
    target = open_target(model, arch, dataset or probe_dataset, threat_model, device, zoo_dataset,
                         normalize=normalize, numerics=numerics)
    data = load_dataset(probe_dataset or target.dataset, split, n_probe, data_dir)
    check_classes(target, data)
    chosen: dict[str, str] = {}
    full_layer, n = resolve_model_layer(target, layer, tuple(data.get(0, 1).x.shape[1:]), chosen)
    a, b = parse_neurons(neurons, n)
    check_precision(precision, target.device)
    req = RankRequest(model=target.model, layer=full_layer, n_neurons=n, num_classes=target.loaded.num_classes,
                      data=data, neurons=(a, b), batch_size=RANK_BATCH, seed=seed, exact_naive=exact_naive,
                      clip_model=clip_model, clip_pretrained=clip_pretrained, clip_cache=clip_cache,
                      clip_template=clip_template, show_progress=progress_enabled(), precision=precision)
    choice = choose_batch_size(batch_size, default=RANK_BATCH, device=target.device, cap=len(data),
                               try_batch=rank_trial(req, m.name), what=f"{m.name} ranking")
    req.batch_size = choice.size
    if batch_size.strip().lower() == "auto":
        req.clip_batch_size = RANK_BATCH  # the search measured the ranked model's pass, not CLIP's
    res = rank(req, m.name, target.provenance(), out, force=force, shard=neurons is not None, note=chosen)
    details = res.meta.get("details") or {}
    result = {"out": str(out), "method": m.name, "layer": full_layer, "shape": list(res.shape), "n_probe": len(data),
              "seconds": round(time.perf_counter() - t0, 3), "kind": res.kind, "neurons": [a, b], "n_neurons": n,
              "skipped": res.skipped, "compute_seconds": res.meta.get("seconds"), "path": details.get("path"),
              "batch_size": req.batch_size, "auto_batch": choice.to_json(), "precision": precision, **chosen, **target.record()}
    for key in ("fallback_reason", "clip_cache", "clip_cache_reused", "classes_without_probes"):
        if key in details:
            result[key] = details[key]
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    t = Table(title=f"igd rank: {r['method']} at {r['layer']}" + ("  (already done: skipped)" if r["skipped"] else ""))
    t.add_column("")
    t.add_column("value", overflow="fold")
    rows = [("out", r["out"]), *([("layer chosen by", r["layer_chosen_by"])] if "layer_chosen_by" in r else []),
            ("kind", r["kind"]), ("shape (N, C)", "×".join(map(str, r["shape"]))),
            ("neurons", f"{r['neurons'][0]}:{r['neurons'][1]} of {r['n_neurons']}"), ("probe images", r["n_probe"]),
            ("computed by", r.get("path") or "-"), ("seconds", r["seconds"])]
    for key in ("fallback_reason", "clip_cache", "clip_cache_reused", "classes_without_probes"):
        if r.get(key) not in (None, []):
            rows.append((key.replace("_", " "), r[key]))
    for k, v in rows:
        t.add_row(k, str(v))
    out_console.print(t)
