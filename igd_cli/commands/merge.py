"""``igd merge SHARD… --out FILE``: join shards (``igd rank --neurons A:B``; ``igd attack`` and ``igd defend-eval``
with ``--shard I/N``) into the full artifact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .. import eval_shards  # registers the adversarial-set and eval-report mergers
from ..cli import ArgCommand, app, emit, examples
from ..console import out_console
from ..evaluate import render_table
from ..options import Json
from ..shards import merge


@app.command("merge", short_help="join shards into the full artifact", epilog=examples(
    "igd rank --model demo --n-probe 200 --neurons 64:128 --out imp-1.safetensors",
    "igd merge imp-0.safetensors imp-1.safetensors --out imp-merged.safetensors"), cls=ArgCommand)
def merge_cmd(
    shards: Annotated[list[Path], typer.Argument(metavar="SHARD", help="shard files; together they must cover every neuron "
                                                     "(importance) or every example (sets, reports) once")],
    out: Annotated[Path, typer.Option("--out", metavar="FILE", help="the merged artifact to write")],
    as_json: Json = False,
) -> None:
    """Check that the shards belong together and cover 0..N-1 exactly once, then write the full artifact."""
    t0 = time.perf_counter()
    res = merge(shards, out)
    meta = res.meta
    result = {"out": str(res.out), "kind": res.kind, "shape": list(res.shape), "n_shards": res.n_shards,
              "method": meta.get("method"), "layer": meta.get("layer"), "seconds": round(time.perf_counter() - t0, 3),
              "igd_code": meta.get("igd_code"), "numerics": meta.get("numerics")}
    result.update(eval_shards.summary(res))
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    t = Table(title=f"igd merge: {r['n_shards']} shards -> {r['out']}")
    t.add_column("")
    t.add_column("value", overflow="fold")
    for k in ("kind", "method", "layer", "shape", "seconds"):
        t.add_row(k, "×".join(map(str, r[k])) if k == "shape" else str(r[k]))
    report = r["kind"] == "eval-report"
    for k in ("attack", "target", "n_examples", "robust_accuracy") if not report else ("attack", "n_examples"):
        if r.get(k) not in (None, {}):
            t.add_row(k, _fmt(r[k]) if "accuracy" in k else str(r[k]))
    out_console.print(t)
    if report:  # every figure recomputed from the shards' per-draw results
        render_table(r, title=f"merged evaluation: accuracy (%), {r['n_examples']} images")


def _fmt(v) -> str:
    """Accuracies (fractions) as percentages; a dict of them as ``name: %`` pairs."""
    if isinstance(v, dict):
        return ", ".join(f"{name}: {100 * a:.2f}%" for name, a in v.items())
    return f"{100 * v:.2f}%"
