"""Size a full run from a pilot: ``--shards`` and ``--time`` for M images, from the seconds a pilot run's tasks took.

    python3 cluster/slurm/size.py PILOT_RUN_DIR --images 10000 [--time 04:00:00] [--margin 2] [--json]

PILOT_RUN_DIR is a finished run of ``submit.sh`` on a few images (e.g. ``--n-examples 64 --shards 2``) with the
options of the full run (model, preset, budgets, layer). Every task logged its piece's ``--json`` line with its
``seconds``; this script takes, per step, the slowest rate (seconds per image, per neuron) over the tasks that
computed (not skipped), and scales it: transfer attacks and the defended evaluation per image, calibration with
its images (the evaluation images, clean passes only), the ranking per neuron (it does not depend on M). It then
prints the smallest ``--shards`` whose slowest attack or evaluation task fits ``--time`` with ``--margin``, and
the ``--time`` every job needs (submit.sh gives every job one ``--time``).

Caveats it cannot remove: a pilot's images stand for the full set (an attack stops early on images it breaks, so a
more robust model costs more per image); the pilot must run on the full run's hardware and ``--cpus-per-task``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: log prefix (the job script's step) -> what a task's seconds scale with
STEPS = {"rank": "neurons", "merge-importance": "fixed", "calibrate": "images", "attack": "images",
         "evaluate": "images", "merge-eval": "images", "result": "images"}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_time(text: str) -> float:
    """SLURM's [D-]HH:MM:SS (or MM:SS, or minutes) -> seconds."""
    days, _, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        fail(f"--time {text}: expected [D-]HH:MM:SS")
    if len(parts) == 1:
        parts = [0, parts[0], 0]
    elif len(parts) == 2:
        parts = [0, *parts]
    h, m, s = parts[-3:]
    return float(((d * 24 + h) * 60 + m) * 60 + s)


def format_time(seconds: float) -> str:
    """Seconds -> SLURM's HH:MM:SS (D-HH:MM:SS beyond a day), rounded up to the minute."""
    minutes = max(1, math.ceil(seconds / 60))
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def records(run: Path, step: str) -> list[dict]:
    """The ``--json`` lines of ``step``'s tasks, every submission (a log holds other lines too)."""
    out = []
    for log in sorted((run / "logs").glob(f"{step}.*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "piece" in rec or step == "result":
                    out.append(rec)
    return out


def rate(step: str, recs: list[dict], pilot_images: int) -> tuple[float, int] | None:
    """(seconds per unit, tasks measured): the slowest computed task of ``step`` (units: STEPS[step]; a job over
    all the pilot's images counts them all)."""
    rates = []
    for r in recs:
        if r.get("skipped") or "seconds" not in r:
            continue
        if STEPS[step] == "neurons":
            units = r["neurons"][1] - r["neurons"][0]
        elif "positions" in r:
            units = r["positions"][1] - r["positions"][0]
        elif STEPS[step] == "images":
            units = pilot_images  # one job over all the run's images
        else:
            units = 1
        rates.append(float(r["seconds"]) / units)
    return (max(rates), len(rates)) if rates else None


def size(run: Path, images: int, limit: float, margin: float) -> dict:
    plan_file = run / "cluster" / "plan.json"
    if not plan_file.is_file():
        fail(f"{plan_file}: not a run folder of cluster/slurm/submit.sh")
    plan = json.loads(plan_file.read_text())
    pilot_n = int(plan["n_examples"])
    steps = {}
    for step, unit in STEPS.items():
        got = rate(step, records(run, step), pilot_n)
        if got is None:
            continue
        per, tasks = got
        if unit == "images" and step in ("attack", "evaluate"):
            per_task = lambda s, per=per: per * math.ceil(images / s)  # noqa: E731
        elif unit == "images":  # one job over all the images
            per_task = lambda s, per=per: per * images  # noqa: E731
        elif unit == "neurons":
            per_task = lambda s, per=per: per * math.ceil(plan["n_neurons"] / min(s, plan["n_neurons"]))  # noqa: E731
        else:
            per_task = lambda s, per=per: per  # noqa: E731
        steps[step] = {"unit": unit, "seconds_per_unit": per, "tasks_measured": tasks, "per_task": per_task}
    if not any(s in steps for s in ("attack", "evaluate")):
        fail(f"{run}/logs: no finished attack or evaluate task with its seconds: run the pilot to the end first")
    sharded = [s for s in ("attack", "evaluate") if s in steps]
    shards = 1
    while shards < images and max(steps[s]["per_task"](shards) for s in sharded) * margin > limit:
        shards = min(images, max(shards + 1, math.ceil(shards * 1.1)))
    table = {s: {"unit": v["unit"], "seconds_per_unit": round(v["seconds_per_unit"], 4),
                 "tasks_measured": v["tasks_measured"], "predicted_task_seconds": round(v["per_task"](shards), 1)}
             for s, v in steps.items()}
    need = max(v["predicted_task_seconds"] for v in table.values()) * margin
    fits = max(steps[s]["per_task"](shards) for s in sharded) * margin <= limit
    over = [s for s, v in table.items() if s not in sharded and v["predicted_task_seconds"] * margin > limit]
    return {"pilot": str(run), "pilot_images": pilot_n, "images": images, "margin": margin,
            "time_limit": format_time(limit), "shards": shards, "time": format_time(need), "fits": fits,
            "unsharded_over_limit": over, "steps": table,
            "submit": f"cluster/slurm/submit.sh RUN_DIR --shards {shards} --time {format_time(need)} -- "
                      f"<the pilot's igd pipeline options, with --n-examples {images}>"}


def parser() -> argparse.ArgumentParser:
    """size.py's options (also what tests check the documented command lines against)."""
    ap = argparse.ArgumentParser(prog="size.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished pilot run folder of submit.sh")
    ap.add_argument("--images", type=int, required=True, help="images of the full run (its --n-examples)")
    ap.add_argument("--time", default="04:00:00", help="the longest wall time a task may take (a partition's limit)")
    ap.add_argument("--margin", type=float, default=2.0, help="safety factor on every predicted time")
    ap.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    if a.images < 1 or a.margin < 1:
        fail("--images must be ≥ 1 and --margin ≥ 1")
    out = size(a.run, a.images, parse_time(a.time), a.margin)
    if a.json:
        print(json.dumps(out))
        return
    print(f"pilot: {out['pilot']} ({out['pilot_images']} images) -> {out['images']} images, margin ×{out['margin']}")
    print(f"{'step':<18}{'per':>8}{'s/unit':>12}{'tasks':>7}{'predicted task':>16}")
    for step, v in out["steps"].items():
        unit = {"images": "image", "neurons": "neuron", "fixed": "job"}[v["unit"]]
        print(f"{step:<18}{unit:>8}{v['seconds_per_unit']:>12.4g}{v['tasks_measured']:>7}"
              f"{format_time(v['predicted_task_seconds']):>16}")
    if not out["fits"]:
        print(f"warning: even one image per task exceeds --time {out['time_limit']} with margin ×{out['margin']}",
              file=sys.stderr)
    for step in out["unsharded_over_limit"]:
        print(f"warning: {step} is one job and needs more than --time {out['time_limit']} (×{out['margin']}): "
              f"ask for --time {out['time']} on a partition that allows it", file=sys.stderr)
    print(out["submit"])


if __name__ == "__main__":
    main(sys.argv[1:])
