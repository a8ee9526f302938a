"""What a cluster user sizes jobs by, on one device (a CUDA GPU, else the CPU): per stage the median time over
``--repeats`` runs after a warm-up, images per second, the batch ``--batch-size auto`` chose and its peak memory,
ratios against the naive method measured in the same run, fp32 against bf16/fp16, and IW-WC against AutoAttack
on an adversarially trained model.

    python benchmarks/bench_gpu.py [--device auto] [--tiny] [--repeats 3] [--out-dir benchmarks/results]
                                   [--models resnet18 wrn-34-10 resnet50] [--n-images 512] [--n-attack 1000]
                                   [--fast-rows R] [--literal-rows 4] [--budgets paper|quick|tiny]
                                   [--batch-size N|auto] [--robust-model mnist|demo] [--workdir DIR]

Models: the real CIFAR-10 ResNet-18 (pyautoattack's ``examples/model_test.pt``), a WRN-34-10 (RobustBench's
architecture, random weights: no checkpoint offline) and a torchvision ResNet-50 with 1000 classes (random
weights). ``--tiny`` swaps in small stand-ins (WRN-16-1; the ResNet-50 on 64×64 images), few images, few
neurons and tiny attack budgets, so that it runs end to end on a CPU in seconds (tests/test_bench_gpu.py).

Per model and precision (fp32; bf16 where autocast runs it; fp16 on CUDA):
* ``forward`` and ``channels-last``: a clean pass of the base model (and with channels-last inputs);
* ``lo-ir``: LO-IR at the penultimate layer and at the stage before it (``layer3``; WRN: ``block2``), the fast
  path on ``R`` neurons against the literal per-neuron ablation timed on ``L`` neurons and scaled to ``R``: the
  literal run is ``L + 1`` forwards per batch (one base pass, one per neuron), ``R`` neurons take ``R + 1``, so the
  scaled time is ``t · (R + 1) / (L + 1)`` (ratio literal / fast); in bf16/fp16 the top-k agreement of the ranking
  with fp32's (Jaccard at k = N/10, N/4, N/2: mean and worst);
* ``defended`` (IG-Defense with smoothing, n_s = 1): the ratio defended / base forward;
* ``calibrate-k``: the whole binary search, in clean passes of the base model over the same images;
* ``iw-wc``: IW-WC (the nine attacks and the adaptive one) on an adversarially trained model's IG-Defense (LO-IR
  ranking, k from calibrate-k) against pyautoattack's standard AutoAttack on the base model, same images: wall
  time, the ratio, and how many images each attack ran on and left robust (AutoAttack stops attacking an image
  once it is broken, IW-WC's defended attacks run on the survivors). The model: ``--robust-model mnist`` (the
  default where ``mnist-test-10000.safetensors`` is in the data folder: examples/mnist_cnn.py trained with FGSM
  at ε = 0.1 by scripts/train_mnist_example.py, kept in ``--workdir``) or ``demo`` (igd's own PGD-trained digits
  model; ``--tiny`` uses it).

Timings: every stage runs once untimed (tracing, planning, cuDNN's algorithm choice, lazy initialisation), then
``--repeats`` times; each run is wrapped in ``torch.cuda.synchronize()`` and times only the device work: the
images are decoded and copied to the device (from pinned memory) before the clock starts. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed runs (null on a CPU). ``--batch-size auto`` (the default on
CUDA) picks each stage's batch as igd does (igd_cli/batching.py) and records the choice; on a CPU the stages use
``--batch-size`` or 128 (tiny 8). Writes ``bench-gpu-<device>[-tiny].json`` and ``.md`` into ``--out-dir``; the
JSON records the command, the numerics (TF32, cuDNN, torch, CUDA), pyautoattack and the machine's load
(``uptime``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("IGD_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _data, bench_precision, also when imported as a module (tests)

from _data import add_data_dir, command_line, find_data_file, write_results  # noqa: E402
from bench_precision import topk_agreement  # noqa: E402
from igd_cli import noise  # noqa: E402
from igd_cli.artifacts import read_metadata, save_artifact  # noqa: E402
from igd_cli.batching import (attack_trial, calibration_trial, choose_batch_size, defended_trial,  # noqa: E402
                              parse_batch_size, rank_trial)
from igd_cli.calibrate import calibrate_k  # noqa: E402
from igd_cli.data import ImageSet, load_dataset  # noqa: E402
from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.devices import resolve_device  # noqa: E402
from igd_cli.errors import IgdError  # noqa: E402
from igd_cli.evaluate import Budgets, evaluate_defense  # noqa: E402
from igd_cli.numerics import record as numerics_record  # noqa: E402
from igd_cli.precision import autocast, check_precision, memory_format  # noqa: E402
from igd_cli.ranking import RankRequest  # noqa: E402
from igd_cli.ranking.lo_ir import lo_ir, lo_ir_naive  # noqa: E402
from igd_cli.ranking.random_ir import random_importance  # noqa: E402

CIFAR_TEST = "cifar10-test-846.safetensors"  # in the data folder (benchmarks/_data.py), when there
MNIST = "mnist-test-10000.safetensors"

#: model -> (classes, image shape (full), image shape (tiny), penultimate layer, layer3-like stage)
MODELS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], str, str]] = {
    "resnet18": (10, (3, 32, 32), (3, 32, 32), "layer4", "layer3"),
    "wrn-34-10": (10, (3, 32, 32), (3, 32, 32), "block3", "block2"),
    "resnet50": (1000, (3, 224, 224), (3, 64, 64), "model.layer4", "model.layer3"),
}
#: sizes of a full run and of --tiny
SIZES = {"full": {"n_images": 512, "fast_rows": None, "literal_rows": 4, "n_attack": 1000, "batch": 128,
                  "repeats": 3},
         "tiny": {"n_images": 8, "fast_rows": 8, "literal_rows": 2, "n_attack": 4, "batch": 8, "repeats": 2}}
#: the tiny attack budgets (a full run uses the paper's: Budgets() leaves every attack at its default)
TINY_BUDGETS = Budgets(steps=2, restarts=1, queries=8, eot_iter=1)


def attack_budgets(name: str) -> Budgets:
    """``--budgets``: paper (every attack's default), quick (igd pipeline's quick preset) or tiny."""
    if name == "tiny":
        return TINY_BUDGETS
    from igd_cli.pipeline import preset_values

    if name == "quick":
        p = preset_values("quick", "")
        return Budgets(steps=p["steps"], restarts=p["restarts"], queries=p["queries"], eot_iter=p["eot_iter"])
    return Budgets()


def numerics(device: torch.device) -> dict[str, Any]:
    """How floating point runs here (igd_cli.numerics.record: mode, device, versions, TF32, determinism), with
    the GPU's compute capability."""
    cuda = device.type == "cuda"
    return {**numerics_record(device),
            "capability": list(torch.cuda.get_device_capability(device)) if cuda else None}


# --- models and images -----------------------------------------------------------------------------------

def build_model(name: str, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, str]:
    """The model (eval mode, on ``device``) and where its weights come from."""
    if name == "resnet18":
        import pyautoattack

        from igd_cli.models import load_model

        path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
        return load_model(str(path), arch="resnet18", device=str(device)).model.eval(), \
            "pyautoattack examples/model_test.pt (standard training)"
    torch.manual_seed(0)
    if name == "wrn-34-10":
        from igd_cli.archs import import_robustbench

        import_robustbench()
        from robustbench.model_zoo.architectures.wide_resnet import WideResNet

        depth, width = (16, 1) if tiny else (34, 10)
        net = WideResNet(depth=depth, widen_factor=width, num_classes=MODELS[name][0])
        return net.eval().to(device), f"random (WideResNet-{depth}-{width}, RobustBench architecture)"
    from igd_cli.archs import ARCHS

    net = ARCHS["resnet50"].build(MODELS[name][0])
    return net.eval().to(device), "random (torchvision ResNet-50, 1000 classes, ImageNet normalisation)"


def images(name: str, n: int, shape: tuple[int, ...], workdir: Path,
           data_dir: Path | None = None) -> tuple[Any, str, Path]:
    """The first ``n`` CIFAR-10 test images for the CIFAR models (when the data folder has them), else
    random synthetic images of ``shape`` with labels ``i mod C``; what they are; their file."""
    classes = MODELS[name][0]
    cifar = find_data_file(CIFAR_TEST, data_dir)
    if classes == 10 and shape == (3, 32, 32) and cifar is not None:
        return load_dataset(str(cifar), "test", min(n, 846)), f"CIFAR-10 test images ({CIFAR_TEST})", cifar
    path = workdir / f"{name}-synthetic-{n}-{'x'.join(map(str, shape))}.safetensors"
    return synthetic_images(n, shape, classes, path), f"random synthetic {'×'.join(map(str, shape))} images", path


def synthetic_images(n: int, shape: tuple[int, ...], classes: int, path: Path) -> ImageSet:
    """``n`` random images of ``shape`` (seeded) with labels ``i mod classes``, written as a data file at ``path``."""
    g = torch.Generator().manual_seed(0)
    save_artifact(path, "dataset", {"x": torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                                    "y": torch.arange(n, dtype=torch.int64) % classes},
                  {"classes": [f"class{i}" for i in range(classes)], "source": "random synthetic images"})
    return load_dataset(str(path), "test", n)


def staged(data: ImageSet, device: torch.device) -> ImageSet:
    """``data`` decoded once and its images put on ``device`` (copied from pinned memory on CUDA) before any clock
    starts: the stages' ``.to(device)`` is then a no-op and their timings hold device work only. The labels stay
    on the CPU, where igd checks them without a device sync. Same images, same identity."""
    batch = data.all()
    x = batch.x
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
        torch.cuda.synchronize(device)
    y = batch.y
    return ImageSet(data.name, data.split, data.classes, len(data), lambda i, j: (x[i:j], y[i:j]),
                    source=data.source, file=data.file, digest=data.source_digest)


# --- timing ------------------------------------------------------------------------------------------------

@dataclass
class Timing:
    """The timed runs of one stage (seconds), their peak GPU memory (MiB, None on a CPU) and the last result."""

    runs: list[float]
    peak_mb: float | None
    result: Any

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def to_json(self, n_images: int) -> dict[str, Any]:
        med = self.median
        return {"seconds": round(med, 4), "seconds_min": round(min(self.runs), 4),
                "seconds_max": round(max(self.runs), 4), "spread": round((max(self.runs) - min(self.runs)) / med, 3)
                if med > 0 else None, "runs": [round(r, 4) for r in self.runs],
                "images_per_s": round(n_images / med, 2) if med > 0 else None, "peak_gpu_mb": self.peak_mb}


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """``fn`` run ``warmup`` times untimed, then ``repeats`` times, each synchronised on CUDA."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    runs, peak, out = [], 0, None
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
            peak = max(peak, torch.cuda.max_memory_allocated(device))
        runs.append(time.perf_counter() - t0)
    return Timing(runs, round(peak / 2 ** 20, 1) if cuda else None, out)


def forward_pass(model: torch.nn.Module, data: Any, batch: int, precision: str, device: torch.device,
                 channels_last: bool | None = None) -> None:
    """One clean pass of ``model`` over ``data`` under ``precision`` (inputs as igd lays them out, or forced
    channels-last / contiguous with ``channels_last``)."""
    with torch.no_grad(), autocast(precision, device):
        for b in data.batches(batch):
            x = b.x.to(device)
            if channels_last is None:
                x = memory_format(x, precision)
            elif x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            with noise.images(noise.image_keys(None, x), noise.stream(0, "bench")):  # as igd's scoring queries
                model(x)


def precisions(device: torch.device) -> list[str]:
    """fp32 and what autocast runs here (bf16; fp16 on CUDA only: CPU fp16 kernels are a slow path)."""
    out = ["fp32"]
    for p in ("bf16", "fp16"):
        if p == "fp16" and device.type != "cuda":
            continue
        try:
            check_precision(p, device)
            out.append(p)
        except IgdError:
            pass
    return out


class Batches:
    """Each stage's batch: ``--batch-size`` as a number, or chosen by igd's ``auto`` search on the stage's trial
    workload (on CUDA; a CPU gets the default); every choice is kept for the results."""

    def __init__(self, spec: str, default: int, device: torch.device):
        self.spec, self.default, self.device = spec, default, device
        self.chosen: dict[str, Any] = {}

    def __call__(self, stage: str, cap: int, trial: Callable[[int], Any]) -> int:
        choice = choose_batch_size(self.spec, default=self.default, device=self.device, cap=cap, try_batch=trial,
                                   what=f"bench {stage}")
        self.chosen[stage] = choice.to_json() or {"batch_size": choice.size, "fixed": True}
        return choice.size


# --- the stages --------------------------------------------------------------------------------------------

def bench_model(name: str, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    size = SIZES["tiny" if args.tiny else "full"]
    repeats = args.repeats or size["repeats"]
    classes, full_shape, tiny_shape, penultimate, stage3 = MODELS[name]
    shape = tiny_shape if args.tiny else full_shape
    model, weights = build_model(name, args.tiny, device)
    n = args.n_images or size["n_images"]
    raw, what, _ = images(name, n, shape, workdir, args.data_dir)
    data = staged(raw, device)
    batches = Batches(args.batch_size, size["batch"], device)
    rows: list[dict[str, Any]] = []
    n_neurons: dict[str, int] = {}

    def row(stage: str, precision: str, t: Timing, batch: int, **extra: Any) -> None:
        rows.append({"stage": stage, "precision": precision, "batch": batch, **t.to_json(len(data)), **extra})

    precs = [p for p in precisions(device) if args.precisions is None or p in args.precisions]
    fwd_batch = batches("forward", len(data), defended_trial(model, data))
    base: dict[str, Timing] = {}
    for p in precs:
        base[p] = measure(lambda: forward_pass(model, data, fwd_batch, p, device), device, repeats)
        row("forward", p, base[p], fwd_batch)
        # channels_last (igd uses it for low precision on CUDA only): channels-last inputs against contiguous ones
        t = {cl: measure(lambda: forward_pass(model, data, fwd_batch, p, device, channels_last=cl), device, repeats)
             for cl in (False, True)}
        row("channels-last", p, t[True], fwd_batch, ratio=round(t[True].median / t[False].median, 3),
            ratio_of="forward with channels-last inputs / contiguous inputs")

    # LO-IR: the fast path on R neurons against the literal ablation timed on L and scaled to R
    from igd_cli.layers import neuron_count

    for layer in (penultimate, stage3):
        big_n = neuron_count(model, layer, shape)
        n_neurons[layer] = big_n
        r = min(big_n, args.fast_rows or size["fast_rows"] or big_n)
        lit_rows = min(r, args.literal_rows or size["literal_rows"])
        req = RankRequest(model=model, layer=layer, n_neurons=big_n, num_classes=classes, data=data, neurons=(0, r))
        batch = batches(f"lo-ir {layer}", len(data), rank_trial(req, "lo-ir"))
        lit = measure(lambda: lo_ir_naive(model, layer, data, classes, neurons=(0, lit_rows), n_neurons=big_n,
                                          batch_size=batch, show_progress=False), device, repeats)
        literal_scaled = lit.median * (r + 1) / (lit_rows + 1)  # L + 1 forwards timed, R + 1 needed
        ref: torch.Tensor | None = None
        for p in precs:
            t = measure(lambda: lo_ir(model, layer, data, classes, neurons=(0, r), batch_size=batch,
                                      show_progress=False, precision=p), device, repeats)
            res = t.result
            extra: dict[str, Any] = {
                "layer": layer, "rows": r, "n_neurons": big_n, "path": res.path, "literal_rows_timed": lit_rows,
                "literal_forwards_timed": lit_rows + 1, "literal_seconds": round(lit.median, 4),
                "literal_seconds_scaled": round(literal_scaled, 4), "ratio": round(literal_scaled / t.median, 3),
                "ratio_of": "literal ablation (fp32, R + 1 forwards) / fast path in this precision, same rows"}
            if p == "fp32":
                ref = res.importance
                extra["max_abs_diff_vs_literal"] = float((res.importance[:lit_rows] - lit.result.importance).abs().max())
            elif ref is not None:
                extra["agreement_vs_fp32"] = topk_agreement(ref, res.importance)
            row("lo-ir", p, t, batch, **extra)

    # the defended forward (smoothing on, n_s = 1) against the base forward, and calibrate-k in clean passes
    big_n = n_neurons[penultimate]
    imp = random_importance(big_n, classes, seed=0)  # which neurons are kept does not change the cost
    mask = topk_mask(imp, max(1, big_n // 4)).to(device)
    defense = IGDefense(model, penultimate, mask, tau=0.01, sigma=4 / 255, n_smooth=1, rs=True, seed=0)
    batch = batches("defended", len(data), defended_trial(defense, data))
    for p in precs:
        t = measure(lambda: forward_pass(defense, data, batch, p, device), device, repeats)
        row("defended", p, t, batch, ratio=round(t.median / base[p].median, 3),
            ratio_of="defended forward / base forward")
    full = IGDefense(model, penultimate, torch.ones(big_n, classes, device=device), tau=0.01, sigma=4 / 255,
                     n_smooth=1, rs=True, seed=0)
    batch = batches("calibrate-k", len(data), calibration_trial(full, data))
    for p in precs:
        t = measure(lambda: calibrate_k(full, imp, data, batch_size=batch, precision=p), device, repeats)
        row("calibrate-k", p, t, batch, ratio=round(t.median / base[p].median, 3),
            ratio_of="calibrate-k / one clean pass of the base model", k=t.result.k,
            candidates=len(t.result.order))
    return {"weights": weights, "images": what, "n_images": len(data), "image_shape": list(shape),
            "repeats": repeats, "n_neurons": n_neurons, "precisions": precs, "batches": batches.chosen,
            "stages": rows}


# --- IW-WC against AutoAttack on an adversarially trained model ----------------------------------------------

def robust_model(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """The adversarially trained model IW-WC and AutoAttack are compared on: its target, probe and evaluation
    images, ε, the masked layer and what it is."""
    from igd_cli.common import open_target

    which = args.robust_model or ("demo" if args.tiny or find_data_file(MNIST, args.data_dir) is None else "mnist")
    size = SIZES["tiny" if args.tiny else "full"]
    n = args.n_attack or size["n_attack"]
    n_probe = 40 if args.tiny else 1000
    if which == "demo":
        target = open_target("demo", None, None, "Linf", str(device), None)
        probe, evaluation = target.data("train", n_probe), target.data("test", n)
        return {"name": "demo", "target": target, "probe": probe, "data": evaluation,
                "eps": target.default_eps(), "layer": target.loaded.default_layer,
                "what": "igd's demo model (DemoCNN, PGD-trained on 8×8 digits)"}
    folder = workdir / "mnist-example"
    weights = folder / "mnist_cnn.safetensors"
    if not weights.exists():  # trained once per --workdir: FGSM with a random start at ε = 0.1
        mnist = find_data_file(MNIST, args.data_dir)
        if mnist is None:
            raise SystemExit(f"bench_gpu: --robust-model mnist needs {MNIST} in the data folder (or --robust-model demo)")
        print("bench_gpu: training the MNIST example adversarially (scripts/train_mnist_example.py) ...",
              file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "train_mnist_example.py"), "--data", str(mnist),
                        "--no-pipeline", "--out-dir", str(folder)], check=True, stdout=subprocess.DEVNULL)
    test, train = sorted(folder.glob("mnist-test-*.safetensors"))[0], sorted(folder.glob("mnist-train-*.safetensors"))[0]
    target = open_target(str(weights), str(ROOT / "examples" / "mnist_cnn.py") + ":small_cnn", str(test), "Linf",
                         str(device), None, normalize="mnist")
    meta = read_metadata(weights)
    return {"name": "mnist", "target": target, "probe": load_dataset(str(train), "test", n_probe),
            "data": target.data("test", n), "eps": float(meta.get("eps", 0.1)), "layer": target.loaded.default_layer,
            "what": f"examples/mnist_cnn.py trained by scripts/train_mnist_example.py (FGSM-RS, ε = "
                    f"{meta.get('eps')}; clean {meta.get('clean_accuracy')}, PGD-20 {meta.get('pgd_accuracy')} on "
                    f"its held-out images)"}


class AutoAttackLog(logging.Handler):
    """pyautoattack's own record of the images robust after each of its attacks (its logger's debug lines)."""

    PATTERN = re.compile(r"(?:initial accuracy|robust accuracy after ([A-Z0-9-]+)): ([0-9.]+)%")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = self.PATTERN.search(record.getMessage())
        if m:
            self.after[(m.group(1) or "clean").lower()] = float(m.group(2)) / 100


def run_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, budgets: Budgets,
                   paper: bool, batch: int, device: torch.device) -> dict[str, Any]:
    """pyautoattack's standard AutoAttack on ``model``: robust accuracy and the images robust after each attack."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=0)
    if not paper:  # the same reduced budgets on AutoAttack's four attacks
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = budgets.steps
        aa.square.n_queries = budgets.queries
    log = AutoAttackLog()
    logger = logging.getLogger("auto-attack")
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG)
    try:
        _, y_adv = aa.run_standard_evaluation(x, y, batch_size=batch)
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
    n = len(y)
    return {"robust_accuracy": float((y_adv.to(y.device) == y).float().mean()),
            "robust_after": {k: {"accuracy": v, "images": round(v * n)} for k, v in log.after.items()}}


def bench_iwwc(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """IW-WC on the robust model's IG-Defense against pyautoattack's standard AutoAttack on the base model."""
    import pyautoattack

    size = SIZES["tiny" if args.tiny else "full"]
    repeats = args.attack_repeats
    rm = robust_model(args, device, workdir)
    target, eps, layer = rm["target"], rm["eps"], rm["layer"]
    model, classes = target.model, target.loaded.num_classes
    data = staged(rm["data"], device)
    n = len(data)
    budget_name = args.budgets or ("tiny" if args.tiny else "paper")
    budgets = attack_budgets(budget_name)
    # the defence: LO-IR on the probe images, k from calibrate-k on the evaluation images, smoothing σ = ε/2
    imp = lo_ir(model, layer, rm["probe"], classes, show_progress=False).importance
    full = IGDefense(model, layer, torch.ones_like(imp, device=device), tau=0.01, sigma=eps / 2, n_smooth=1, rs=True,
                     seed=0)
    k = calibrate_k(full, imp, data, batch_size=256).k
    defense = IGDefense(model, layer, topk_mask(imp, k).to(device), tau=0.01, sigma=eps / 2, n_smooth=1, rs=True,
                        seed=0)
    batches = Batches(args.batch_size, size["batch"], device)
    batch = batches("iw-wc", n, attack_trial([defense, model], data, "iw-wc", eps=eps, num_classes=classes))
    x, y = data.all().x, data.all().y.to(device)

    def iwwc(images: Any, folder: Path, b: Budgets) -> Any:
        return evaluate_defense(target, defense, images, attack="iw-wc", workdir=folder, budgets=b, eps=eps, seed=0,
                                batch_size=batch, defense_meta={"mask": f"LO-IR top-{k} (bench)"}, show_progress=False)

    # warm-up on two images at tiny budgets (tracing, cuDNN's choices), then each timed run in a fresh folder (a
    # folder of this run only: nothing is reused from an earlier one)
    scratch = Path(tempfile.mkdtemp(prefix="adv-", dir=workdir))
    try:
        iwwc(data.view(0, min(2, n)), scratch / "warmup", TINY_BUDGETS)
        run_autoattack(model, x[:2], y[:2], eps, TINY_BUDGETS, False, batch, device)
        counter = iter(range(10 ** 6))
        t_iwwc = measure(lambda: iwwc(data, scratch / f"run-{next(counter)}", budgets), device, repeats, warmup=0)
        t_aa = measure(lambda: run_autoattack(model, x, y, eps, budgets, budget_name == "paper", batch, device),
                       device, repeats, warmup=0)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    js = t_iwwc.result.to_json()
    attacked = js.get("measured_on_survivors") or {}
    columns = {col: {"robust_accuracy": acc, "attacked_images": attacked.get(col, n)}
               for col, acc in (js.get("robust_accuracy") or {}).items()}
    return {"model": rm["what"], "robust_model": rm["name"], "n_images": n, "eps": eps, "layer": layer, "k": k,
            "batch": batch, "batches": batches.chosen, "repeats": repeats,
            "budgets": f"{budget_name} " + json.dumps(vars(budgets)) if budget_name != "paper"
            else "the paper's (every attack's default)",
            "iwwc": t_iwwc.to_json(n), "autoattack": t_aa.to_json(n),
            "ratio": round(t_iwwc.median / t_aa.median, 3),
            "ratio_of": "IW-WC on the defended model (with its base attacks) / standard AutoAttack on the base model",
            "iwwc_columns": columns, "worst_case": js.get("worst_case"), "clean_accuracy": js.get("clean_accuracy"),
            "base_clean_accuracy": js.get("base_clean_accuracy"),
            "autoattack_robust_accuracy": t_aa.result["robust_accuracy"],
            "autoattack_robust_after": t_aa.result["robust_after"],
            "autoattack_version": "standard", "pyautoattack": getattr(pyautoattack, "__version__", None)}


# --- output ------------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """Every ratio of the run, flat (``model/stage/layer/precision`` -> value)."""
    out = {}
    for name, m in result["models"].items():
        for r in m["stages"]:
            if "ratio" in r:
                key = "/".join(str(v) for v in (name, r["stage"], r.get("layer"), r["precision"]) if v)
                out[key] = r["ratio"]
    w = result.get("iwwc_vs_autoattack")
    if w:
        out[f"{w['robust_model']}/iw-wc-vs-autoattack/fp32"] = w["ratio"]
    return out


def _agreement(a: dict[str, Any] | None) -> str:
    """``mean / worst`` top-k Jaccard, or nothing."""
    return f"{a['mean']} / {a['worst']}" if a else ""


def markdown(result: dict[str, Any]) -> str:
    nm = result["numerics"]
    lines = [f"# bench_gpu: {result['device']} ({result['mode']})", "",
             f"`{result['command']}` · torch {nm['torch']} · CUDA {nm['cuda']} · cuDNN {nm['cudnn']} · TF32 "
             f"{'on' if nm['tf32'] else 'off'} · load: `{result['uptime']}`", "",
             "Seconds: median of the timed runs (min–max); images/s from the median.", "",
             "| model | stage | layer | precision | batch | seconds | images/s | ratio | of | agreement vs fp32 | "
             "peak GPU MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        for r in m["stages"]:
            lines.append(f"| {name} | {r['stage']} | {r.get('layer', '')} | {r['precision']} | {r['batch']} | "
                         f"{r['seconds']} ({r['seconds_min']}–{r['seconds_max']}) | {r['images_per_s']} | "
                         f"{r.get('ratio', '')} | {r.get('ratio_of', '')} | "
                         f"{_agreement(r.get('agreement_vs_fp32'))} | "
                         f"{r['peak_gpu_mb'] if r['peak_gpu_mb'] is not None else '-'} |")
    w = result.get("iwwc_vs_autoattack")
    if w:
        after = ", ".join(f"{k} {v['images']}" for k, v in w["autoattack_robust_after"].items())
        cols = ", ".join(f"{k} {100 * v['robust_accuracy']:.1f} % ({v['attacked_images']} attacked)"
                         for k, v in w["iwwc_columns"].items())
        lines += ["", f"IW-WC vs standard AutoAttack on {w['model']} ({w['n_images']} images, ε = {w['eps']:.4g}, "
                      f"budgets: {w['budgets']}, batch {w['batch']}): IW-WC {w['iwwc']['seconds']} s, AutoAttack "
                      f"{w['autoattack']['seconds']} s, ratio **{w['ratio']}** ({w['ratio_of']}).", "",
                  f"AutoAttack's robust images after each attack: {after}; robust accuracy "
                  f"{100 * w['autoattack_robust_accuracy']:.1f} %.", "",
                  f"IW-WC (k = {w['k']} at {w['layer']}): worst case {w['worst_case']}; per column: {cols}."]
    lines += ["", "Models: " + "; ".join(f"{k}: {v['weights']}, {v['n_images']} {v['images']}"
                                         for k, v in result["models"].items()), ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line (the docs' examples are parsed with it: tests)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    add_data_dir(ap)
    ap.add_argument("--tiny", action="store_true", help="small stand-in models, few images, tiny budgets (CPU, tests)")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per stage after the warm-up (default 3; "
                    "tiny 2): the median is reported, with the min and max")
    ap.add_argument("--precisions", nargs="+", default=None, choices=("fp32", "bf16", "fp16"),
                    help="only these (default: fp32 and every reduced precision autocast runs here)")
    ap.add_argument("--attack-repeats", type=int, default=1, help="timed runs of IW-WC and of AutoAttack")
    ap.add_argument("--n-images", type=int, default=None, help="images per stage (default 512; tiny 8)")
    ap.add_argument("--n-attack", type=int, default=None, help="IW-WC vs AutoAttack images (default 1000; tiny 4)")
    ap.add_argument("--literal-rows", type=int, default=None, help="neurons the literal LO-IR is timed on")
    ap.add_argument("--fast-rows", type=int, default=None,
                    help="neurons the fast LO-IR computes (default all; tiny 8): a CPU cannot rank every neuron of "
                         "layer3 of the big models in reasonable time")
    ap.add_argument("--budgets", choices=("paper", "quick", "tiny"), default=None,
                    help="IW-WC and AutoAttack budgets (default paper; tiny with --tiny)")
    ap.add_argument("--batch-size", default="auto", help="N or auto (default: auto, igd's search on CUDA; on a CPU "
                    "auto is 128, tiny 8)")
    ap.add_argument("--robust-model", choices=("mnist", "demo"), default=None,
                    help="the adversarially trained model of IW-WC vs AutoAttack (default: mnist when its data file is "
                         "in the data folder, else demo; tiny: demo)")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the trained MNIST example between runs "
                    "(default: a temporary folder)")
    ap.add_argument("--no-attack", action="store_true", help="skip IW-WC vs AutoAttack")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default=None, help="file name tag (default: the device kind, -tiny in tiny mode)")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    parse_batch_size(args.batch_size)
    device = resolve_device(args.device)
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = ""
    result: dict[str, Any] = {
        "device": f"{device.type}: {device_name(device)}", "device_kind": device.type,
        "mode": "tiny" if args.tiny else "full", "command": command_line("bench_gpu.py", argv),
        "numerics": numerics(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "uptime": uptime, "models": {}, "iwwc_vs_autoattack": None}
    with tempfile.TemporaryDirectory(prefix="igd-bench-gpu-") as tmp:
        work = Path(tmp)
        for name in args.models:
            print(f"bench_gpu: {name} ...", file=sys.stderr)
            result["models"][name] = bench_model(name, args, device, work)
        if not args.no_attack:
            print("bench_gpu: IW-WC vs AutoAttack ...", file=sys.stderr)
            keep = args.workdir or work
            keep.mkdir(parents=True, exist_ok=True)
            result["iwwc_vs_autoattack"] = bench_iwwc(args, device, keep)
    result["ratios"] = ratios(result)
    bad = {k: v for k, v in result["ratios"].items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    if bad:
        raise SystemExit(f"bench_gpu: ratios that are not positive finite numbers: {bad}")
    tag = args.tag or (device.type + ("-tiny" if args.tiny else ""))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    result = write_results(args.out_dir / f"bench-gpu-{tag}.json", result, args.data_dir)
    (args.out_dir / f"bench-gpu-{tag}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
