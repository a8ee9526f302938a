"""What a cluster user sizes jobs by, on one device (a CUDA GPU, else the CPU): ratios against the naive method
measured in the same run, images per second per stage, peak GPU memory, fp32 against bf16/fp16 where offered.

    python benchmarks/bench_gpu.py [--device auto] [--tiny] [--out-dir benchmarks/results]
                                   [--models resnet18 wrn-34-10 resnet50] [--n-images 512] [--n-attack 1000]
                                   [--fast-rows R] [--literal-rows 4] [--budgets paper|quick|tiny]

Models: the real CIFAR-10 ResNet-18 (pyautoattack's ``examples/model_test.pt``), a WRN-34-10 (RobustBench's
architecture, random weights: no checkpoint offline) and a torchvision ResNet-50 with 1000 classes (random
weights). ``--tiny`` swaps in small stand-ins (WRN-16-1; the ResNet-50 on 64×64 images), few images, few
neurons and tiny attack budgets, so that it runs end to end on a CPU in seconds (tests/test_bench_gpu.py).

Per model and precision (fp32; bf16 where autocast runs it; fp16 on CUDA):
* ``lo-ir``: LO-IR at the penultimate layer and at the stage before it (``layer3``; WRN: ``block2``), the fast
  path on ``R`` neurons against the literal per-neuron ablation timed on a few neurons and scaled to ``R``
  (ratio literal / fast; fp32 only for the literal);
* ``forward`` (the base model) and ``defended`` (IG-Defense with smoothing, n_s = 1): the ratio defended / base;
* ``calibrate-k``: the whole binary search, in clean passes of the base model over the same images;
* ``iw-wc`` (ResNet-18, fp32): one IW-WC (the nine attacks and the adaptive one, at the paper's budgets; tiny
  budgets with ``--tiny``) on ``--n-attack`` CIFAR-10 test images against pyautoattack's standard AutoAttack on the
  base model and the same images: the wall-time ratio.

Every timing is wrapped in ``torch.cuda.synchronize()`` on CUDA; peak memory is ``torch.cuda.max_memory_allocated``
per stage (null on a CPU). Writes ``bench-gpu-<device>[-tiny].json`` and ``.md`` into ``--out-dir``; the JSON
records the command, the device, torch, pyautoattack and the machine's load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

os.environ.setdefault("IGD_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _data, also when imported as a module (tests)

from _data import add_data_dir, find_data_file, write_results  # noqa: E402
from igd_cli.artifacts import save_artifact  # noqa: E402
from igd_cli.calibrate import calibrate_k  # noqa: E402
from igd_cli.data import load_dataset  # noqa: E402
from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.devices import resolve_device  # noqa: E402
from igd_cli.errors import IgdError  # noqa: E402
from igd_cli.evaluate import Budgets, evaluate_defense  # noqa: E402
from igd_cli.precision import autocast, check_precision, memory_format  # noqa: E402
from igd_cli.ranking.lo_ir import lo_ir, lo_ir_naive  # noqa: E402
from igd_cli.ranking.random_ir import random_importance  # noqa: E402

CIFAR_TEST = "cifar10-test-846.safetensors"  # in the data folder (benchmarks/_data.py), when there

#: model -> (classes, image shape (full), image shape (tiny), penultimate layer, layer3-like stage)
MODELS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], str, str]] = {
    "resnet18": (10, (3, 32, 32), (3, 32, 32), "layer4", "layer3"),
    "wrn-34-10": (10, (3, 32, 32), (3, 32, 32), "block3", "block2"),
    "resnet50": (1000, (3, 224, 224), (3, 64, 64), "model.layer4", "model.layer3"),
}
#: sizes of a full run and of --tiny
SIZES = {"full": {"n_images": 512, "fast_rows": None, "literal_rows": 4, "n_attack": 1000, "batch": 128},
         "tiny": {"n_images": 8, "fast_rows": 8, "literal_rows": 2, "n_attack": 4, "batch": 8}}
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
    g = torch.Generator().manual_seed(0)
    path = workdir / f"{name}-synthetic-{n}-{'x'.join(map(str, shape))}.safetensors"
    save_artifact(path, "dataset", {"x": torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                                    "y": torch.arange(n, dtype=torch.int64) % classes},
                  {"classes": [f"class{i}" for i in range(classes)], "source": "random synthetic images"})
    return load_dataset(str(path), "test", n), f"random synthetic {'×'.join(map(str, shape))} images", path


# --- timing ------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float | None]:
    """(result, seconds, peak GPU memory in MiB or None), synchronised on CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    return out, seconds, (round(peak, 1) if peak is not None else None)


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


# --- the stages --------------------------------------------------------------------------------------------

def bench_model(name: str, args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    size = SIZES["tiny" if args.tiny else "full"]
    classes, full_shape, tiny_shape, penultimate, stage3 = MODELS[name]
    shape = tiny_shape if args.tiny else full_shape
    model, weights = build_model(name, args.tiny, device)
    n = args.n_images or size["n_images"]
    data, what, _ = images(name, n, shape, workdir, args.data_dir)
    batch = args.batch_size or size["batch"]
    rows: list[dict[str, Any]] = []
    n_neurons: dict[str, int] = {}

    def row(stage: str, precision: str, seconds: float, peak: float | None, n_img: int, **extra: Any) -> None:
        rows.append({"stage": stage, "precision": precision, "seconds": round(seconds, 4),
                     "images_per_s": round(n_img / seconds, 2) if seconds > 0 else None, "peak_gpu_mb": peak,
                     **extra})

    precs = precisions(device)
    base_seconds: dict[str, float] = {}
    for p in precs:
        forward_pass(model, data, batch, p, device)  # warm-up (cuDNN autotuning, lazy init)
        _, s, peak = timed(lambda: forward_pass(model, data, batch, p, device), device)
        base_seconds[p] = s
        row("forward", p, s, peak, len(data))
        # channels_last (igd uses it for low precision on CUDA only): channels-last inputs against contiguous ones
        times = {}
        for cl in (False, True):
            forward_pass(model, data, batch, p, device, channels_last=cl)
            _, times[cl], _ = timed(lambda: forward_pass(model, data, batch, p, device, channels_last=cl), device)
        row("channels-last", p, times[True], None, len(data), ratio=round(times[True] / times[False], 3),
            ratio_of="forward with channels-last inputs / contiguous inputs")

    # LO-IR: the fast path on R neurons against the literal ablation timed on a few and scaled to R
    for layer in (penultimate, stage3):
        from igd_cli.layers import neuron_count

        big_n = neuron_count(model, layer, shape)
        n_neurons[layer] = big_n
        r = min(big_n, args.fast_rows or size["fast_rows"] or big_n)
        lit_rows = min(r, args.literal_rows or size["literal_rows"])
        lit, s_lit, _ = timed(lambda: lo_ir_naive(model, layer, data, classes, neurons=(0, lit_rows),
                                                  n_neurons=big_n, batch_size=batch, show_progress=False), device)
        literal_scaled = s_lit * r / lit_rows
        for p in precs:
            res, s, peak = timed(lambda: lo_ir(model, layer, data, classes, neurons=(0, r), batch_size=batch,
                                               show_progress=False, precision=p), device)
            extra = {"layer": layer, "rows": r, "n_neurons": big_n, "path": res.path,
                     "literal_rows_timed": lit_rows, "literal_seconds_scaled": round(literal_scaled, 4),
                     "ratio": round(literal_scaled / s, 3),
                     "ratio_of": "literal ablation (fp32) / fast path in this precision, same rows"}
            if p == "fp32":
                extra["max_abs_diff_vs_literal"] = float((res.importance[:lit_rows] - lit.importance).abs().max())
            row("lo-ir", p, s, peak, len(data), **extra)

    # the defended forward (smoothing on, n_s = 1) against the base forward, and calibrate-k in clean passes
    big_n = n_neurons[penultimate]
    imp = random_importance(big_n, classes, seed=0)  # which neurons are kept does not change the cost
    mask = topk_mask(imp, max(1, big_n // 4)).to(device)
    defense = IGDefense(model, penultimate, mask, tau=0.01, sigma=4 / 255, n_smooth=1, rs=True, seed=0)
    for p in precs:
        forward_pass(defense, data, batch, p, device)
        _, s, peak = timed(lambda: forward_pass(defense, data, batch, p, device), device)
        row("defended", p, s, peak, len(data), ratio=round(s / base_seconds[p], 3),
            ratio_of="defended forward / base forward")
    full = IGDefense(model, penultimate, torch.ones(big_n, classes, device=device), tau=0.01, sigma=4 / 255,
                     n_smooth=1, rs=True, seed=0)
    for p in precs:
        cal, s, peak = timed(lambda: calibrate_k(full, imp, data, batch_size=batch, precision=p), device)
        row("calibrate-k", p, s, peak, len(data), ratio=round(s / base_seconds[p], 3),
            ratio_of="calibrate-k / one clean pass of the base model", k=cal.k,
            candidates=len(cal.order))
    return {"weights": weights, "images": what, "n_images": len(data), "image_shape": list(shape),
            "batch_size": batch, "n_neurons": n_neurons, "precisions": precs, "stages": rows}


def bench_iwwc(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict[str, Any]:
    """One IW-WC on the defended ResNet-18 against pyautoattack's standard AutoAttack on the base model."""
    import pyautoattack
    from pyautoattack import AutoAttack

    from igd_cli.common import open_target

    size = SIZES["tiny" if args.tiny else "full"]
    path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
    n = args.n_attack or size["n_attack"]
    data, what, file = images("resnet18", n, (3, 32, 32), workdir, args.data_dir)
    target = open_target(str(path), "resnet18", str(file), "Linf", str(device), None)
    model = target.model
    n = len(data)
    eps = 8 / 255
    budget_name = args.budgets or ("tiny" if args.tiny else "paper")
    budgets = attack_budgets(budget_name)
    batch = args.batch_size or size["batch"]
    big_n = 512
    mask = topk_mask(random_importance(big_n, 10, seed=0), big_n // 4).to(device)
    defense = IGDefense(model, "layer4", mask, tau=0.01, sigma=eps / 2, n_smooth=1, rs=True, seed=0)
    res, s_iwwc, peak_iwwc = timed(lambda: evaluate_defense(
        target, defense, data, attack="iw-wc", workdir=workdir / "adv", budgets=budgets, eps=eps, seed=0,
        batch_size=batch, defense_meta={"mask": "random top-N/4 (bench)"}, show_progress=False), device)
    batch_all = data.all()
    x, y = batch_all.x.to(device), batch_all.y.to(device)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=0)
    if budget_name != "paper":  # the same reduced budgets on AutoAttack's four attacks
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = budgets.steps
        aa.square.n_queries = budgets.queries
    (x_adv, y_adv), s_aa, peak_aa = timed(lambda: aa.run_standard_evaluation(x, y, batch_size=batch), device)
    aa_acc = float((y_adv == y).float().mean())  # pyautoattack's predictions on its adversarial points
    js = res.to_json()
    return {"n_images": n, "images": what, "eps": eps, "budgets": f"{budget_name} " + json.dumps(vars(budgets))
            if budget_name != "paper" else "the paper's (every attack's default)", "iwwc_seconds": round(s_iwwc, 3),
            "autoattack_seconds": round(s_aa, 3), "ratio": round(s_iwwc / s_aa, 3),
            "ratio_of": "IW-WC on the defended model (with its base attacks) / standard AutoAttack on the base model",
            "iwwc_images_per_s": round(n / s_iwwc, 3), "autoattack_images_per_s": round(n / s_aa, 3),
            "peak_gpu_mb": {"iw-wc": peak_iwwc, "autoattack": peak_aa},
            "worst_case": js.get("worst_case"), "autoattack_robust_accuracy": aa_acc,
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
    if result.get("iwwc_vs_autoattack"):
        out["resnet18/iw-wc-vs-autoattack/fp32"] = result["iwwc_vs_autoattack"]["ratio"]
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# bench_gpu: {result['device']} ({result['mode']})", "",
             f"`{result['command']}` · torch {result['torch']} · load: `{result['uptime']}`", "",
             "| model | stage | layer | precision | seconds | images/s | ratio | of | peak GPU MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        for r in m["stages"]:
            lines.append(f"| {name} | {r['stage']} | {r.get('layer', '')} | {r['precision']} | {r['seconds']} | "
                         f"{r['images_per_s']} | {r.get('ratio', '')} | {r.get('ratio_of', '')} | "
                         f"{r['peak_gpu_mb'] if r['peak_gpu_mb'] is not None else '-'} |")
    w = result.get("iwwc_vs_autoattack")
    if w:
        lines += ["", f"IW-WC vs standard AutoAttack ({w['n_images']} {w['images']}, ε = 8/255, budgets: "
                      f"{w['budgets']}): IW-WC {w['iwwc_seconds']} s, AutoAttack {w['autoattack_seconds']} s, "
                      f"ratio **{w['ratio']}** ({w['ratio_of']})."]
    lines += ["", "Models: " + "; ".join(f"{k}: {v['weights']}, {v['n_images']} {v['images']}"
                                         for k, v in result["models"].items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    add_data_dir(ap)
    ap.add_argument("--tiny", action="store_true", help="small stand-in models, few images, tiny budgets (CPU, tests)")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--n-images", type=int, default=None, help="images per stage (default 512; tiny 8)")
    ap.add_argument("--n-attack", type=int, default=None, help="IW-WC vs AutoAttack images (default 1000; tiny 4)")
    ap.add_argument("--literal-rows", type=int, default=None, help="neurons the literal LO-IR is timed on")
    ap.add_argument("--fast-rows", type=int, default=None,
                    help="neurons the fast LO-IR computes (default all; tiny 8): a CPU cannot rank every neuron of "
                         "layer3 of the big models in reasonable time")
    ap.add_argument("--budgets", choices=("paper", "quick", "tiny"), default=None,
                    help="IW-WC and AutoAttack budgets (default paper; tiny with --tiny)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--no-attack", action="store_true", help="skip IW-WC vs AutoAttack")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default=None, help="file name tag (default: the device kind, -tiny in tiny mode)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = ""
    result: dict[str, Any] = {
        "device": f"{device.type}: {device_name(device)}", "device_kind": device.type,
        "mode": "tiny" if args.tiny else "full", "command": " ".join(["python benchmarks/bench_gpu.py",
                                                                       *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "uptime": uptime, "models": {},
        "iwwc_vs_autoattack": None}
    with tempfile.TemporaryDirectory(prefix="igd-bench-gpu-") as tmp:
        work = Path(tmp)
        for name in args.models:
            print(f"bench_gpu: {name} ...", file=sys.stderr)
            result["models"][name] = bench_model(name, args, device, work)
        if not args.no_attack:
            print("bench_gpu: IW-WC vs AutoAttack ...", file=sys.stderr)
            result["iwwc_vs_autoattack"] = bench_iwwc(args, device, work)
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
