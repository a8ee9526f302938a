"""``igd layers``: the layers of a model with their output shapes, to choose ``--layer``."""

from __future__ import annotations

import torch
from rich.table import Table

from ..cli import app, emit
from ..common import open_target
from ..console import out_console
from ..data import load_dataset
from ..options import Arch, DataDir, Dataset, Device, Json, Model, Normalize, ThreatModel


@app.command("layers")
def layers_cmd(model: Model = "demo", arch: Arch = None, dataset: Dataset = None, data_dir: DataDir = None,
               threat_model: ThreatModel = "Linf", device: Device = "auto", as_json: Json = False,
               normalize: Normalize = None) -> None:
    """List the model's layers with their output shapes (N = the first dimension after the batch)."""
    target = open_target(model, arch, dataset, threat_model, device, normalize)
    x = load_dataset(target.dataset, "test", 1, data_dir).get(0, 1).x.to(target.device)
    shapes: dict[str, list[int]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: shapes.__setitem__(n, list(out.shape[1:]))
                                     if isinstance(out, torch.Tensor) else None)
             for n, m in target.model.named_modules() if n]
    try:
        with torch.no_grad():
            target.model(x)
    finally:
        for h in hooks:
            h.remove()
    rows = [{"layer": n, "type": type(m).__name__, "shape": shapes.get(n)}
            for n, m in target.model.named_modules() if n]
    emit({"model": target.loaded.name, "default_layer": target.loaded.default_layer, "layers": rows}, as_json, _render)


def _render(r: dict) -> None:
    t = Table(title=f"layers of {r['model']} (default masked layer: {r['default_layer']})")
    for col in ("layer", "type", "output (N, ...)"):
        t.add_column(col)
    for row in r["layers"]:
        t.add_row(row["layer"], row["type"], "×".join(map(str, row["shape"])) if row["shape"] else "-")
    out_console.print(t)
