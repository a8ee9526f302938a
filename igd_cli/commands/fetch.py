"""``igd fetch``: download (or verify already placed) a model's checkpoint and a data set into igd's caches, once,
on a node with network, so that compute nodes without it only read (docs/cluster.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import app, emit, examples
from ..console import out_console
from ..data import DATASETS, data_dir as resolve_data_dir, load_dataset
from ..devices import resolve_device
from ..download import zoo_checkpoint_fill
from ..models import igd_home, load_model, robustbench_entry
from ..options import DataDir, Dataset, Json, Model, ThreatModel, ZooDataset


@app.command("fetch", short_help="fill the model and data caches once, for offline nodes", epilog=examples(
    "igd fetch --model demo",
    "igd fetch --model Addepalli2022Efficient_RN18 --dataset cifar10   # needs a download"))
def fetch_cmd(
    model: Model = "demo",
    dataset: Dataset = None,
    data_dir: DataDir = None,
    threat_model: ThreatModel = "Linf",
    zoo_dataset: ZooDataset = None,
    mirror: Annotated[Optional[str], typer.Option("--mirror", metavar="URL", envvar="IGD_MIRROR", help="download from this mirror "
                                                  "(http(s):// or file://) laid out as models/<ds>/<tm>/<name>.pt "
                                                  "and data/<archive>, instead of the zoo's and torchvision's hosts")] = None,
    as_json: Json = False,
) -> None:
    """Put the model's checkpoint under $IGD_HOME/models and the data set under --data-dir, checked by loading them.

    Safe to run from several processes at once: each cache entry is filled once, under a lock, and appears only
    complete. Offline, a missing file is one error line naming what to place where.
    """
    if mirror:
        os.environ["IGD_MIRROR"] = mirror
    zoo_path, filled = None, False
    if model != "demo" and not model.startswith("torchvision:") and not Path(model).expanduser().exists():
        zoo = robustbench_entry(model, threat_model, zoo_dataset=zoo_dataset, prefer=dataset)
        zoo_path = zoo.checkpoint()
        filled = zoo_checkpoint_fill(model, zoo.dataset, zoo.threat_model, zoo_path)  # False: it was there
    loaded = load_model(model, None, dataset, threat_model, resolve_device("cpu"), zoo_dataset=zoo_dataset)
    if zoo_path is not None:
        m_status, m_path = ("downloaded" if filled else "present (verified by loading)"), str(zoo_path)
    else:
        m_status = {"demo": "embedded in igd", "file": "local file (loaded)", "torchvision": "torch.hub cache"}.get(
            loaded.source, loaded.source)
        m_path = loaded.info.get("checkpoint") or (model if loaded.source == "file" else None)
    name = dataset or loaded.dataset
    d: dict = {"name": name}
    if name is not None:
        root = resolve_data_dir(data_dir)
        folder = None
        if name in ("cifar10", "cifar100"):
            import torchvision

            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            folder = root / cls.base_folder
        had_data = folder is not None and folder.exists()
        sizes = {split: len(load_dataset(name, split, None, data_dir)) for split in ("train", "test")}
        if folder is not None:
            d.update(path=str(folder), status="present (verified)" if had_data else "downloaded")
        elif name == "digits":
            d.update(path=None, status="bundled with scikit-learn")
        else:
            d.update(path=str(root / name) if name in DATASETS else name, status="present (verified)")
        d.update(n_train=sizes["train"], n_test=sizes["test"])
    result = {"model": {"name": loaded.name, "source": loaded.source, "path": m_path, "status": m_status,
                        "fingerprint": loaded.fingerprint},
              "dataset": d, "igd_home": str(igd_home()), "data_dir": str(resolve_data_dir(data_dir))}
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    t = Table(title="igd fetch: ready for nodes without network")
    for col in ("", "what", "where", "status"):
        t.add_column(col, overflow="fold")
    m, d = r["model"], r["dataset"]
    t.add_row("model", m["name"], str(m["path"] or "-"), m["status"])
    if d.get("name"):
        t.add_row("data set", f"{d['name']} ({d['n_train']} train, {d['n_test']} test)", str(d["path"] or "-"),
                  d["status"])
    out_console.print(t)
