"""``igd inspect FILE``: kind, tensors (shape, dtype) and metadata of any safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..artifacts import read_metadata, tensor_info
from ..cli import ArgCommand, app, emit, examples
from ..console import out_console
from ..defense import mask_summary
from ..options import Json


@app.command("inspect", short_help="kind, tensors and metadata of a safetensors file", epilog=examples(
    "igd inspect mask.safetensors"), cls=ArgCommand)
def inspect_cmd(file: Annotated[Path, typer.Argument(metavar="FILE", help="a safetensors file (igd artifact or any other)")],
                as_json: Json = False) -> None:
    """Show the kind, tensors and metadata of a safetensors file."""
    meta = read_metadata(file)
    tensors = tensor_info(file)
    result = {"file": str(file), "kind": meta.get("kind"), "tensors": tensors, "metadata": meta,
              "bytes": file.stat().st_size}
    if meta.get("kind") == "mask":
        result["masks"] = mask_summary(meta, tensors)
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    out_console.print(f"[bold]{r['file']}[/bold]  kind: [cyan]{r['kind'] or '(not an igd artifact)'}[/cyan]  "
                      f"({r['bytes']:,} bytes)")
    t = Table(title="tensors")
    for col in ("name", "shape", "dtype"):
        t.add_column(col)
    for name, info in r["tensors"].items():
        t.add_row(name, "×".join(map(str, info["shape"])) or "scalar", info["dtype"])
    out_console.print(t)
    if r.get("masks"):
        mt = Table(title="masked layers")
        for col in ("layer", "tensor", "N", "k (neurons kept per class)"):
            mt.add_column(col, justify="left" if col in ("layer", "tensor") else "right")
        for row in r["masks"]:
            mt.add_row(str(row["layer"]), row["tensor"], str(row["n_neurons"]), str(row["k"]))
        out_console.print(mt)
    m = Table(title="metadata")
    m.add_column("key")
    m.add_column("value", overflow="fold")
    for k, v in sorted(r["metadata"].items()):
        m.add_row(k, str(v) if not isinstance(v, (dict, list)) else __import__("json").dumps(v))
    out_console.print(m)
