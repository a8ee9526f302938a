"""``igd layers``: the layers of a model with their output shapes, to choose ``--layer``.

Listing layers needs an input shape, not images: it comes from ``--input-shape``, the architecture or zoo entry,
and only when neither says, from the first image of the data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import app, emit
from ..common import model_input_shape, parse_input_shape
from ..console import out_console
from ..devices import resolve_device
from ..layers import layer_table
from ..models import load_model
from ..options import Arch, DataDir, Dataset, Device, Json, Model, Normalize, ThreatModel, ZooDataset


@app.command("layers", short_help="the layers of a model with their output shapes")
def layers_cmd(model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
               threat_model: ThreatModel = "Linf", zoo_dataset: ZooDataset = None,
               input_shape: Annotated[Optional[str], typer.Option(
                   "--input-shape", help="C,H,W of one image (default: the architecture's or zoo entry's, e.g. "
                                         "3,32,32 for CIFAR, 3,224,224 for ImageNet; else --dataset's first image)")
               ] = None,
               device: Device = "auto", as_json: Json = False, normalize: Normalize = None) -> None:
    """List the model's layers with their output shapes (N = the first dimension after the batch). Needs no data."""
    shape_given = parse_input_shape(input_shape)
    loaded = load_model(model, arch, dataset, threat_model, resolve_device(device), zoo_dataset=zoo_dataset,
                        normalize=normalize)
    shape = model_input_shape(loaded, shape_given, dataset, data_dir)
    emit({"model": loaded.name, "default_layer": loaded.default_layer, "input_shape": list(shape),
          "layers": layer_table(loaded.model, shape)}, as_json, _render)


def _render(r: dict) -> None:
    t = Table(title=f"layers of {Path(r['model']).name} for one {'×'.join(map(str, r['input_shape']))} image "
                    f"(default masked layer: {r['default_layer']})")
    for col in ("layer", "type", "output (N, ...)"):
        t.add_column(col)
    for row in r["layers"]:
        t.add_row(row["layer"], row["type"], "×".join(map(str, row["shape"])) if row["shape"] else "-")
    out_console.print(t)
