"""``igd layers``: the layers of a model with their output shapes, to choose ``--layer``.

Listing layers needs an input shape, not images: it comes from ``--input-shape``, the architecture or zoo entry,
and only when neither says, from the first image of the data set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import app, emit, examples
from ..common import model_input_shape, parse_input_shape
from ..console import out_console
from ..devices import resolve_device
from ..layers import layer_table
from ..models import load_model
from ..options import Arch, DataDir, Dataset, Device, Json, Model, Normalize, ThreatModel, ZooDataset


@app.command("layers", short_help="the layers of a model with their output shapes", epilog=examples(
    "igd layers --model demo",
    "igd layers --model runs/mnist-example/mnist_cnn.safetensors --arch examples/mnist_cnn.py:small_cnn --normalize mnist --input-shape 1,28,28   # needs the weights scripts/train_mnist_example.py writes"))
def layers_cmd(model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
               threat_model: ThreatModel = "Linf", zoo_dataset: ZooDataset = None,
               input_shape: Annotated[Optional[str], typer.Option(
                   "--input-shape", metavar="C,H,W", help="C,H,W of one image (default: the architecture's or zoo entry's, e.g. "
                                         "3,32,32 for CIFAR, 3,224,224 for ImageNet; else --dataset's first image)")
               ] = None,
               device: Device = "auto", as_json: Json = False, normalize: Normalize = None) -> None:
    """List the model's layers with their output shapes (N = the first dimension after the batch), and the layer
    masked when --layer is not given. Needs no data."""
    shape_given = parse_input_shape(input_shape)
    loaded = load_model(model, arch, dataset, threat_model, resolve_device(device), zoo_dataset=zoo_dataset,
                        normalize=normalize)
    shape = model_input_shape(loaded, shape_given, dataset, data_dir)
    table = layer_table(loaded.model, shape)  # first: a clean error if the model does not run on this shape
    default, why = loaded.masked_layer(shape)
    emit({"model": loaded.name, "default_layer": default, "default_layer_chosen_by" if default else
          "no_default_layer_because": why, "input_shape": list(shape), "layers": table}, as_json, _render)


def _render(r: dict) -> None:
    t = Table(title=f"layers of {Path(r['model']).name} for one {'×'.join(map(str, r['input_shape']))} image")
    for col in ("layer", "type", "output (N, ...)"):
        t.add_column(col)
    for row in r["layers"]:
        t.add_row(row["layer"], row["type"], "×".join(map(str, row["shape"])) if row["shape"] else "-")
    out_console.print(t)
    if r["default_layer"]:
        out_console.print(f"default masked layer: [bold]{r['default_layer']}[/bold], {r['default_layer_chosen_by']}",
                          highlight=False)
    else:
        out_console.print(f"no default masked layer: {r['no_default_layer_because']}; give --layer", highlight=False)
