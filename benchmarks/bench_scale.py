"""Scale sanity: the paper's large settings run end to end, with wall time and peak memory per stage.

ResNet-50 with 1000 classes (``model.layer4``, N = 2048, the paper's k = 750) on 224×224 images, and WideResNet-34-10
with 100 classes (``block3``, N = 640) on 32×32 images, both with random weights (no such checkpoint can be
downloaded here) and random synthetic images of the right shape. Every stage is one ``igd`` command run in its own
process, so its memory is its own: the resident set size (RSS, from ``/proc/self/status``) peaks while the model
loads and again during the work; the table gives the peak while loading, the RSS right after loading (the
baseline: Python, torch and the model), the peak of the rest of the stage, and that peak minus the baseline, the
memory the stage's own work needs. Stages: rank (LO-IR, random), calibrate-k (binary search; and the paper's k),
defend-eval clean accuracy, and a small attack (APGD-CE on the defended model). Accuracies of random weights mean
nothing; the point is that every stage runs at these sizes and what it costs. Time is split the same way: the
whole stage, loading, and the work after loading, also as a multiple of one plain forward pass of the model over
the same images (timed in the ``load`` row: the naive baseline every stage is compared with).

    python benchmarks/bench_scale.py [--models resnet50 wrn-34-10] [--n-images 8] [--attack-images 2]
                                     [--steps 2] [--workdir /tmp/igd-scale] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _data import write_results  # noqa: E402
from igd_cli.archs import ARCHS  # noqa: E402
from igd_cli.artifacts import save_artifact  # noqa: E402

#: model -> (--arch, classes, image shape, masked layer, N, the paper's k)
SETTINGS = {
    "resnet50": ("resnet50", 1000, (3, 224, 224), "model.layer4", 2048, 750),
    "wrn-34-10": ("wrn-34-10", 100, (3, 32, 32), "block3", 640, 50),
}

#: runs one igd command and reports on stderr, as its last line (JSON): wall time, the process's peak RSS while
#: loading the model, its RSS right after, and its peak RSS during the rest of the stage (Linux: the peak is reset
#: after loading by writing 5 to /proc/self/clear_refs; elsewhere the stage peak is the whole process's)
CHILD = """
import json, resource, sys, time
import igd_cli.common as common

def status(key):
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

marks = {}
_open = common.open_target

def open_target(*a, **k):
    target = _open(*a, **k)
    marks["load_seconds"] = time.perf_counter() - t0
    marks["load_peak_mb"], marks["after_load_mb"] = status("VmHWM"), status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        marks["peak_reset"] = True
    except OSError:
        marks["peak_reset"] = False
    return target

common.open_target = open_target  # before the command modules import it
t0 = time.perf_counter()
if sys.argv[1] == "--load-only":  # the baseline: load, then one plain forward pass over the images
    import torch
    target = open_target(*sys.argv[2:6], device="cpu")
    data = target.data("test", None)
    t1 = time.perf_counter()
    with torch.no_grad():
        for batch in data.batches(8):
            target.model(batch.x)
    marks["forward_seconds"] = time.perf_counter() - t1
    code = 0
else:
    from igd_cli.cli import main
    code = main(sys.argv[1:])
print("IGD-SCALE " + json.dumps({"code": code, "seconds": time.perf_counter() - t0,
      "stage_peak_mb": status("VmHWM"), **marks}), file=sys.stderr)
"""


def synthetic(workdir: Path, name: str, n_classes: int, shape: tuple[int, ...], n: int, seed: int = 0) -> Path:
    """Random uint8 images of ``shape`` with labels 0..n-1 mod C, in igd's data-file format."""
    g = torch.Generator().manual_seed(seed)
    path = workdir / f"{name}-synthetic-{n}.safetensors"
    save_artifact(path, "dataset", {"x": torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                                    "y": torch.arange(n, dtype=torch.int64) % n_classes},
                  {"classes": [f"class{i}" for i in range(n_classes)], "source": "random synthetic images"})
    return path


def random_weights(workdir: Path, arch: str, n_classes: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = ARCHS[arch].build(n_classes)
    path = workdir / f"{arch}-{n_classes}-random.safetensors"
    save_artifact(path, "model", {k: v.contiguous() for k, v in net.state_dict().items()},
                  {"arch": arch, "weights": f"random (torch.manual_seed({seed}))"})
    return path


def run_stage(args: list[str]) -> dict:
    load_before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "IGD_NO_PROGRESS": "1"})
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("IGD-SCALE ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"stage failed: igd {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    out = json.loads(line[-1][len("IGD-SCALE "):])
    if out["code"] != 0:
        raise SystemExit(f"stage failed ({out['code']}): igd {' '.join(map(str, args))}\n{proc.stderr[-2000:]}")
    out["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    try:
        out["result"] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        out["result"] = None
    return out


def bench(model: str, workdir: Path, n_images: int, attack_images: int, steps: int) -> list[dict]:
    arch, n_classes, shape, layer, n, paper_k = SETTINGS[model]
    weights = random_weights(workdir, arch, n_classes)
    data = synthetic(workdir, model, n_classes, shape, n_images)
    common = ["--model", weights, "--arch", arch, "--dataset", data, "--device", "cpu", "--batch-size", 8]
    imp = {m: workdir / f"{model}-imp-{m}.safetensors" for m in ("lo-ir", "random")}
    mask, mask_k = workdir / f"{model}-mask.safetensors", workdir / f"{model}-mask-k{paper_k}.safetensors"
    eps = ["--eps", "4/255" if n_classes == 1000 else "8/255"]
    stages = [
        ("load (model only: the baseline)", ["--load-only", weights, arch, data, "Linf"]),
        ("rank LO-IR", ["rank", *common, "--layer", layer, "--method", "lo-ir", "--out", imp["lo-ir"], "--json"]),
        ("rank random", ["rank", *common, "--layer", layer, "--method", "random", "--out", imp["random"], "--json"]),
        ("calibrate-k (search)", ["calibrate-k", *common, *eps, "--importance", imp["lo-ir"], "--out", mask,
                                  "--json"]),
        (f"calibrate-k --k {paper_k}", ["calibrate-k", *common, *eps, "--importance", imp["lo-ir"],
                                         "--k", paper_k, "--out", mask_k, "--json"]),
        ("defend-eval clean", ["defend-eval", *common, *eps, "--mask", mask_k, "--json"]),
        (f"attack APGD-CE ({steps} steps) on the defence", [
            "attack", *common, *eps, "--mask", mask_k, "--attack", "apgd-ce", "--steps", steps,
            "--n-examples", attack_images, "--out", workdir / f"{model}-adv.safetensors", "--json"]),
    ]
    rows = []
    forward = None
    for name, args in stages:
        print(f"{model}: {name} ...", file=sys.stderr, flush=True)
        r = run_stage(args)
        work = r["seconds"] - r["load_seconds"]
        forward = r.get("forward_seconds", forward)
        res = r["result"] or {}
        note = {"rank LO-IR": lambda: f"shape {res.get('shape')}, {res.get('path')}",
                "calibrate-k (search)": lambda: f"k = {res.get('k')} of {res.get('n_neurons')}, "
                                                f"{len(res.get('curve', []))} k evaluated"}.get(name, lambda: "")()
        rows.append({"model": model, "stage": name, "seconds": round(r["seconds"], 2),
                     "load_seconds": round(r["load_seconds"], 2), "work_seconds": round(work, 2),
                     "x_forward": round(work / forward, 1) if forward else None,
                     "load_peak_mb": round(r["load_peak_mb"]), "after_load_mb": round(r["after_load_mb"]),
                     "stage_peak_mb": round(r["stage_peak_mb"]),
                     "stage_extra_mb": round(r["stage_peak_mb"] - r["after_load_mb"]) if r["peak_reset"] else None,
                     "load_avg": r["load_avg"], "note": note})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--n-images", type=int, default=8, help="probe / calibration / evaluation images")
    ap.add_argument("--attack-images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="APGD-CE iterations of the small attack")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/igd-scale"))
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--out", type=Path, help="also write the results here (JSON)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        rows += bench(model, args.workdir, args.n_images, args.attack_images, args.steps)
    setup = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "n_images": args.n_images,
             "attack_images": args.attack_images, "steps": args.steps,
             "memory": "RSS of the stage's own process from /proc/self/status: VmHWM while loading the model, "
                       "VmRSS right after, VmHWM of the rest (reset after loading via /proc/self/clear_refs); "
                       "stage_extra = the rest's peak minus the RSS after loading"}
    if args.out is not None:
        write_results(args.out, {"setup": setup, "rows": rows})
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows}))
        return
    from igd_cli.console import out_console
    from igd_cli.report import timing_table

    for r in rows:
        r["load avg (before → after)"] = f"{r['load_avg'][0]} → {r['load_avg'][1]}"
    out_console.print(timing_table(f"scale sanity ({args.n_images} images, CPU, {os.cpu_count()} cores)", rows,
                                   ["model", "stage", "seconds", "load_seconds", "work_seconds", "x_forward",
                                    "load_peak_mb", "after_load_mb", "stage_peak_mb", "stage_extra_mb",
                                    "load avg (before → after)", "note"]))


if __name__ == "__main__":
    main()
