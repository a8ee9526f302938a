"""The checks of benchmarks/check_gpu.sh: is igd right on this GPU node? One verdict line per check.

    benchmarks/check_gpu.sh [--cpu-dry-run] [--out-dir DIR] [--data-dir DIR] [--skip CHECK ...]

Checks, in order (each prints ``PASS name: figures`` or ``FAIL name: figures``):

1. ``cuda-vs-cpu``: the demo model's LO-IR ranking (top-k Jaccard, the tolerance of tests/test_precision.py),
   calibrate-k's k and defend-eval's clean and APGD-CE figures on a randomized defence, on CUDA and on the CPU.
   Float rounding differs between the two (and cuDNN may run fp32 convolutions in TF32): k within 1, accuracies
   within :data:`ACCURACY_TOLERANCE`.
2. ``same-answer``: benchmarks/check_same_answer.py on CUDA: batch 5 = batch 64 = two shards, every attack,
   figures and per-image decisions exactly.
3. ``precision``: bf16 LO-IR against fp32 on CUDA (benchmarks/bench_precision.py): the demo model's ``block3``
   by the closed form and by the batched tail, and the CIFAR-10 ResNet-18's ``layer4`` and ``layer3`` when the data
   file is there; top-k Jaccard mean ≥ 0.9 and worst ≥ 0.8.
4. ``auto-batch``: ``--batch-size auto`` for an APGD-CE attack on a defended ResNet-18 (4096 synthetic CIFAR-size
   images: enough to meet the memory wall of most GPUs), then the real attack at the chosen batch: it must not
   run out of memory, and its peak is reported against the search's budget.
5. ``host-syncs``: ``torch.cuda.set_sync_debug_mode("warn")`` over APGD-CE, Square and clean scoring on the
   defended demo model at two budgets; every synchronising call is counted at its call site in igd (or
   pyautoattack). A site whose count grows with the budget syncs every step or query: FAIL when one is igd's.
6. ``bench``: benchmarks/bench_gpu.py at a size that fits the ten minutes (ResNet-18, 256 images, quick budgets,
   IW-WC against AutoAttack on the demo model): its results files.

``--cpu-dry-run`` runs every check on the CPU at tiny sizes (the test suite does): the CUDA-vs-CPU check then
compares the CPU with itself and the sync check counts nothing, so it shows that the checks run, not that a GPU is
right (its bench runs fp32 only: tests/test_bench_gpu.py runs the reduced precisions). Writes
``check-gpu-<device>.json`` (every check's figures) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("IGD_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_gpu  # noqa: E402
import bench_precision  # noqa: E402
import check_same_answer  # noqa: E402
from _data import add_data_dir, command_line, find_data_file, write_results  # noqa: E402
from check_same_answer import run_igd  # noqa: E402

#: CUDA vs CPU: clean and robust accuracies may differ by this much (fractions: float rounding moves attack
#: trajectories and the images near a decision boundary), k by one
ACCURACY_TOLERANCE = 0.03
#: the precision check's tolerance (tests/test_precision.py's)
MEAN_JACCARD, MIN_JACCARD = 0.9, 0.8
#: a call site syncs per step when its count at twice the budget is more than this times its count at the budget
GROWTH = 1.5
CHECKS = ("cuda-vs-cpu", "same-answer", "precision", "auto-batch", "host-syncs", "bench")


@dataclass
class Verdict:
    name: str
    ok: bool
    figures: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.figures} ({self.seconds:.0f} s)"


@dataclass
class Setup:
    device: str
    dry: bool
    out_dir: Path
    data_dir: Path | None
    work: Path


# --- 1. CUDA vs CPU on the demo -----------------------------------------------------------------------------

def demo_figures(device: str, work: Path, n: int, steps: int) -> dict[str, Any]:
    """The demo pipeline's figures on ``device``: LO-IR importance, calibrate-k's k, defend-eval clean and APGD-CE."""
    folder = work / f"demo-{device.replace(':', '-')}"
    folder.mkdir(parents=True, exist_ok=True)
    imp, mask = folder / "imp.safetensors", folder / "mask.safetensors"
    run_igd("rank", "--model", "demo", "--out", imp, "--device", device, "--n-probe", max(n, 100))
    cal = run_igd("calibrate-k", "--model", "demo", "--importance", imp, "--out", mask, "--device", device,
                  "--n-examples", n)
    ev = run_igd("defend-eval", "--model", "demo", "--mask", mask, "--attack", "apgd-ce", "--steps", steps,
                 "--n-examples", n, "--device", device, "--workdir", folder / "adv")
    from igd_cli.artifacts import load_artifact

    return {"importance": load_artifact(imp, kind="importance").tensors["importance"], "k": cal["k"],
            "clean": ev["clean_accuracy"], "robust": ev["robust_accuracy"]["apgd-ce"],
            "base_robust": ev["base_robust_accuracy"]["apgd-ce"]}


def check_cuda_vs_cpu(s: Setup) -> Verdict:
    n, steps = (20, 2) if s.dry else (200, 10)
    a = demo_figures(s.device, s.work, n, steps)
    b = demo_figures("cpu", s.work / "reference", n, steps)
    agr = bench_precision.topk_agreement(b["importance"], a["importance"])
    diffs = {key: abs(float(a[key]) - float(b[key])) for key in ("clean", "robust", "base_robust")}
    ok = (agr["mean"] >= MEAN_JACCARD and agr["worst"] >= MIN_JACCARD and abs(a["k"] - b["k"]) <= 1
          and all(d <= ACCURACY_TOLERANCE for d in diffs.values()))
    figs = (f"{s.device} vs cpu on {n} demo images: LO-IR top-k Jaccard {agr['mean']} / worst {agr['worst']}, "
            f"k {a['k']} vs {b['k']}, clean {100 * a['clean']:.1f} vs {100 * b['clean']:.1f} %, APGD-CE defended "
            f"{100 * a['robust']:.1f} vs {100 * b['robust']:.1f} %, base {100 * a['base_robust']:.1f} vs "
            f"{100 * b['base_robust']:.1f} %")
    return Verdict("cuda-vs-cpu", ok, figs, {"agreement": agr, "k": [a["k"], b["k"]], "differences": diffs,
                                             "device": {k: v for k, v in a.items() if k != "importance"},
                                             "cpu": {k: v for k, v in b.items() if k != "importance"}})


# --- 2. batch size and shard independence ---------------------------------------------------------------------

def check_same_answer_on_device(s: Setup) -> Verdict:
    args = ["--quick", "--device", s.device, "--out", str(s.out_dir / f"same-answer-{_tag(s)}.json"),
            "--workdir", str(s.work / "same-answer")]
    args += ["--n-examples", "6", "--attacks", "fgsm", "apgd-ce"] if s.dry else ["--n-examples", "30"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = check_same_answer.main(args)
    lines = out.getvalue().strip().splitlines()
    res = json.loads((s.out_dir / f"same-answer-{_tag(s)}.json").read_text())
    return Verdict("same-answer", code == 0, lines[-1].split(": ", 1)[-1] if lines else "no output",
                   {"lines": lines, "differ": res["differ"]})


# --- 3. bf16 rankings against fp32 -----------------------------------------------------------------------------

def check_precision(s: Setup) -> Verdict:
    from igd_cli.data import load_dataset
    from igd_cli.models import load_model

    dev = torch.device(s.device)
    rows = []
    demo = load_model("demo", device=s.device)
    probe = load_dataset("digits", "train", 300 if s.dry else 500)
    for path in ("closed-form", "batched-tail"):  # block3 both ways (its N = 128: k >= 13 at N/10)
        rows.append(("demo", bench_precision.compare(demo.model, "block3", probe, 10, "bf16", path=path)))
    cifar = find_data_file("cifar10-train-4660.safetensors", s.data_dir)
    if cifar is not None:
        import pyautoattack

        path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
        model = load_model(str(path), arch="resnet18", device=s.device).model
        data = load_dataset(str(cifar), "train", 16 if s.dry else 200)
        for layer in ("layer4", "layer3"):
            rows.append(("resnet18", bench_precision.compare(model, layer, data, 10, "bf16",
                                                             neurons=(0, 32) if s.dry else None)))
    ok = all(r["agreement"]["mean"] >= MEAN_JACCARD and r["agreement"]["worst"] >= MIN_JACCARD for _, r in rows)
    figs = ", ".join(f"{m} {r['layer']} ({r['path']}) {r['agreement']['mean']} / {r['agreement']['worst']}"
                     for m, r in rows)
    return Verdict("precision", ok, f"bf16 vs fp32 top-k Jaccard mean / worst on {dev.type}: {figs}"
                   + ("" if cifar is not None else "; ResNet-18 skipped (no CIFAR-10 file in the data folder)"),
                   {"rows": [{"model": m, **r} for m, r in rows]})


# --- 4. --batch-size auto under an attack's real workload ------------------------------------------------------

def check_auto_batch(s: Setup) -> Verdict:
    from igd_cli.attacks import make_attack, run_attack
    from igd_cli.batching import attack_trial, choose_batch_size
    from igd_cli.defense import IGDefense, topk_mask
    from igd_cli.ranking.random_ir import random_importance

    dev = torch.device(s.device)
    n, steps = (8, 2) if s.dry else (4096, 5)
    model, _ = bench_gpu.build_model("resnet18", s.dry, dev)
    raw = bench_gpu.synthetic_images(n, (3, 32, 32), 10, s.work / f"synthetic-{n}.safetensors")
    what = f"{n} random synthetic 3×32×32 images"
    data = bench_gpu.staged(raw, dev)
    defense = IGDefense(model, "layer4", topk_mask(random_importance(512, 10, seed=0), 128).to(dev), tau=0.01,
                        sigma=4 / 255, n_smooth=1, rs=True, seed=0)
    eps = 8 / 255
    choice = choose_batch_size("auto", default=128, device=dev, cap=n, what="APGD-CE on the defended ResNet-18",
                               try_batch=attack_trial([defense], data, "apgd-ce", eps=eps, num_classes=10),
                               search=True if s.dry else None)
    b = choice.size
    atk = make_attack("apgd-ce", defense, eps=eps, num_classes=10, steps=steps)
    positions = torch.arange(min(n, 2 * b))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    error = None
    try:
        run_attack(atk, data, batch_size=b, positions=positions, show_progress=False)
    except Exception as exc:  # noqa: BLE001 - the verdict names any failure of the real run
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    peak = torch.cuda.max_memory_reserved(dev) / 2 ** 20 if dev.type == "cuda" else None
    js = choice.to_json()
    available = js.get("available_mb")
    ok = error is None and (peak is None or available is None or peak <= available)
    wall = "met the memory wall" if js["failed"] else f"fit at the cap {js['cap']}"
    trial = f"trial peak {js['peak_mb']} MiB" if js["peak_mb"] is not None else "no memory probe on a CPU"
    figs = (f"batch {b} ({wall}; {trial}), real APGD-CE at that batch: "
            + (f"failed: {error}" if error else f"ran, peak {peak:.0f} MiB of {available} MiB available "
               f"(headroom left {100 * (1 - peak / available):.1f} %)" if peak is not None and available
               else "ran"))
    return Verdict("auto-batch", ok, figs, {"choice": js, "real_peak_mb": peak, "error": error, "images": what})


# --- 5. host syncs per call site -----------------------------------------------------------------------------

#: the code a sync is attributed to: the innermost frame of one of these packages
SITES = ("igd_cli", "pyautoattack")


def sync_sites(fn: Callable[[], Any], device: torch.device) -> collections.Counter:
    """Run ``fn`` with torch's sync debug mode on ``warn`` (CUDA) and count the synchronising calls per call site:
    ``path:line`` of the innermost frame in igd_cli or pyautoattack (else the innermost frame)."""
    counts: collections.Counter = collections.Counter()

    def hook(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 - warnings' signature
        if "synchroniz" not in str(message):
            return
        site = f"{filename}:{lineno}"
        for frame in reversed(traceback.extract_stack()[:-1]):
            parts = Path(frame.filename).parts
            for pkg in SITES:
                if pkg in parts:
                    site = f"{'/'.join(parts[parts.index(pkg):])}:{frame.lineno}"
                    break
            else:
                continue
            break
        counts[site] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = hook
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return counts


def per_step_sites(small: collections.Counter, big: collections.Counter) -> dict[str, tuple[int, int]]:
    """Call sites whose sync count grew with the budget (more than :data:`GROWTH` times): they sync per step."""
    return {site: (small.get(site, 0), n) for site, n in big.items() if n > GROWTH * small.get(site, 0)}


def check_host_syncs(s: Setup) -> Verdict:
    from igd_cli.attacks import make_attack
    from igd_cli.data import load_dataset
    from igd_cli.defense import IGDefense, topk_mask
    from igd_cli.models import load_model
    from igd_cli.ranking.random_ir import random_importance
    from igd_cli.scoring import classify

    dev = torch.device(s.device)
    demo = load_model("demo", device=s.device)
    batch = load_dataset("digits", "test", 16).all()
    x, y = batch.x.to(dev), batch.y.to(dev)
    defense = IGDefense(demo.model, demo.default_layer, topk_mask(random_importance(128, 10, seed=0), 16).to(dev),
                        tau=0.01, sigma=0.1, n_smooth=1, rs=True, seed=0)
    workloads = {
        "apgd-ce": lambda b: make_attack("apgd-ce", defense, eps=0.2, num_classes=10, steps=b)(x, y, batch.index),
        "square": lambda b: make_attack("square", defense, eps=0.2, num_classes=10, queries=10 * b)(x, y, batch.index),
        "scoring": lambda b: classify(defense, x, y, b, seed=0, batch_size=16),
    }
    results, growing = {}, {}
    for name, work in workloads.items():
        small = sync_sites(lambda: work(4), dev)
        big = sync_sites(lambda: work(8), dev)
        results[name] = {"budget 4": dict(small.most_common(8)), "budget 8": dict(big.most_common(8))}
        growing.update({f"{name} {site}": v for site, v in per_step_sites(small, big).items()})
    ours = {k: v for k, v in growing.items() if " igd_cli/" in k}
    total = sum(sum(r["budget 8"].values()) for r in results.values())
    figs = (f"{total} synchronising calls at budget 8 over APGD-CE, Square and scoring; call sites syncing every "
            f"step/query: {len(ours)} in igd" + (" (" + ", ".join(f"{k} {a}->{b}" for k, (a, b) in
                                                           sorted(ours.items())[:6]) + ")" if ours else "")
            + f", {len(growing) - len(ours)} in pyautoattack")
    if dev.type != "cuda":
        figs += " (a CPU has no device syncs: nothing to count)"
    return Verdict("host-syncs", not ours, figs, {"per_workload": results,
                                                  "per_step": {k: list(v) for k, v in growing.items()}})


# --- 6. the bench -------------------------------------------------------------------------------------------

def check_bench(s: Setup) -> Verdict:
    tag = f"check-{_tag(s)}"
    args = ["--device", s.device, "--out-dir", str(s.out_dir), "--tag", tag, "--robust-model", "demo",
            "--workdir", str(s.work / "bench")]
    if s.data_dir is not None:
        args += ["--data-dir", str(s.data_dir)]
    args += ["--tiny", "--models", "resnet18", "--precisions", "fp32"] if s.dry else [
        "--models", "resnet18", "--n-images", "256", "--repeats", "3", "--budgets", "quick", "--n-attack", "100"]
    with contextlib.redirect_stdout(io.StringIO()):
        res = bench_gpu.main(args)
    m = res["models"]["resnet18"]
    fwd = {r["precision"]: r["images_per_s"] for r in m["stages"] if r["stage"] == "forward"}
    w = res["iwwc_vs_autoattack"]
    figs = (f"ResNet-18 forward {', '.join(f'{p} {v} images/s' for p, v in fwd.items())}; IW-WC / AutoAttack "
            f"{w['ratio']} on the demo model; -> bench-gpu-{tag}.json, .md")
    return Verdict("bench", True, figs, {"ratios": res["ratios"]})


def _tag(s: Setup) -> str:
    return "cpu-dry-run" if s.dry else torch.device(s.device).type


RUNNERS: dict[str, Callable[[Setup], Verdict]] = {
    "cuda-vs-cpu": check_cuda_vs_cpu, "same-answer": check_same_answer_on_device, "precision": check_precision,
    "auto-batch": check_auto_batch, "host-syncs": check_host_syncs, "bench": check_bench}


def parser() -> argparse.ArgumentParser:
    """The command line (the docs' examples are parsed with it: tests)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every check on the CPU at tiny sizes")
    ap.add_argument("--device", default="cuda", help="the device checked (default cuda)")
    ap.add_argument("--skip", nargs="*", default=[], choices=CHECKS, metavar="CHECK", help=f"of {', '.join(CHECKS)}")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    add_data_dir(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    device = "cpu" if args.cpu_dry_run else args.device
    if not args.cpu_dry_run and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (run with --cpu-dry-run to check the checks on the CPU)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="igd-check-gpu-") as tmp:
        s = Setup(device, args.cpu_dry_run, args.out_dir, args.data_dir, Path(tmp))
        os.environ["IGD_HOME"] = str(s.work / "igd-home")  # nothing cached elsewhere is reused
        for name in CHECKS:
            if name in args.skip:
                continue
            t0 = time.perf_counter()
            try:
                v = RUNNERS[name](s)
            except Exception as exc:  # noqa: BLE001 - a check that breaks is a FAIL line, the others still run
                v = Verdict(name, False, f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                            {"traceback": traceback.format_exc()})
            v.seconds = time.perf_counter() - t0
            verdicts.append(v)
            print(v.line(), flush=True)
    total = time.perf_counter() - t_all
    failed = [v.name for v in verdicts if not v.ok]
    print(f"{'FAIL' if failed else 'PASS'} check_gpu: {len(verdicts) - len(failed)} of {len(verdicts)} checks pass "
          f"on {device} in {total / 60:.1f} min" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    record = {"command": command_line("check_gpu.sh", argv).replace("python benchmarks/", "benchmarks/"),
              "device": device, "dry_run": args.cpu_dry_run, "numerics": bench_gpu.numerics(torch.device(device)),
              "seconds": round(total, 1), "checks": [{"name": v.name, "ok": v.ok, "figures": v.figures,
                                                       "seconds": round(v.seconds, 1), **v.details}
                                                      for v in verdicts]}
    out = args.out_dir / f"check-gpu-{'cpu-dry-run' if args.cpu_dry_run else torch.device(device).type}.json"
    write_results(out, record, args.data_dir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
