"""The demo pipeline end to end, timed: ``igd pipeline --out run --json`` in a fresh folder and ``$IGD_HOME``.

It writes the result the README's first table quotes, with the wall time and the machine's load. With
``--baseline-tree DIR`` (a checkout of another igd revision) it runs the same command with that code first, in
its own fresh folder, and reports both wall times and their ratio from this one run, so the cost of a change is
measured on the same machine in the same state. With ``--audit-out FILE`` it then audits the defence the run made
(``igd audit --mask run/mask-lo-ir-block3.safetensors --preset quick --workdir run/adv --json``, the README's
second command) and writes that result, timed, to FILE.

    python benchmarks/bench_pipeline_demo.py --out benchmarks/results/pipeline-demo-quick-cpu.json
    python benchmarks/bench_pipeline_demo.py --baseline-tree ../igd-old --out benchmarks/results/pipeline-demo-quick-cpu.json
    python benchmarks/bench_pipeline_demo.py --audit-out benchmarks/results/audit-demo-quick-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import command_line, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load() -> str | None:
    """The load averages (1, 5, 15 min) as one string, or None where the system has none."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return None


def revision(tree: Path) -> str | None:
    """The git commit of ``tree`` (with ``+dirty`` when it has uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


#: the README's audit of the defence the demo pipeline made (run in the pipeline's folder)
AUDIT = ["audit", "--mask", "run/mask-lo-ir-block3.safetensors", "--preset", "quick", "--workdir", "run/adv", "--json"]


def igd(tree: Path, tmp: str, args: list[str]) -> dict:
    """``igd ARGS`` with the code of ``tree`` in the folder ``tmp`` (its own ``$IGD_HOME``): wall seconds, load and
    the JSON it printed."""
    env = {**os.environ, "PYTHONPATH": str(tree), "IGD_HOME": str(Path(tmp) / "home"), "IGD_NO_PROGRESS": "1"}
    before = load()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "igd_cli", *args], cwd=tmp, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: igd {args[0]} with the code of {tree} failed: {p.stderr.strip().splitlines()[-1]}")
    return {"wall_seconds": round(seconds, 1), "load_at_start": before, "load_at_end": load(),
            "revision": revision(tree), "result": json.loads(p.stdout)}


def run_pipeline(tree: Path, args: list[str], audit: bool = False) -> dict:
    """``igd pipeline --out run --json ARGS`` with the code of ``tree`` in a fresh folder (then, with ``audit``, the
    README's audit of the defence it made, under ``"audit"``)."""
    with tempfile.TemporaryDirectory(prefix="igd-pipeline-") as tmp:
        out = igd(tree, tmp, ["pipeline", "--out", "run", "--json", *args])
        if audit:
            out["audit"] = igd(tree, tmp, AUDIT)
        return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="a checkout of another igd revision: the same command timed with its code first")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--audit-out", type=Path, default=None,
                    help="then audit the defence the run made and write that result, timed, here")
    ap.add_argument("pipeline_args", nargs="*", help="more igd pipeline options (after --)")
    a = ap.parse_args(argv)
    out: dict = {"command": command_line("bench_pipeline_demo.py", argv),
                 "pipeline_command": " ".join(["igd pipeline --out run --json", *a.pipeline_args]),
                 "machine": f"{os.cpu_count()} CPU cores, torch's default threads; load averages (1, 5, 15 min) "
                            f"recorded at the start and end of each run",
                 "date": time.strftime("%Y-%m-%d")}
    if a.baseline_tree is not None:
        base = run_pipeline(a.baseline_tree.resolve(), a.pipeline_args)
        # the checkout is named by its revision, not by where it lay on this machine
        out["command"] = out["command"].replace(f"--baseline-tree {a.baseline_tree}",
                                                f"--baseline-tree ../igd-{base['revision']}")
        print(f"baseline ({base['revision']}): {base['wall_seconds']} s, worst case "
              f"{base['result']['worst_case']}", flush=True)
    now = run_pipeline(ROOT, a.pipeline_args, audit=a.audit_out is not None)
    print(f"this code ({now['revision']}): {now['wall_seconds']} s, worst case {now['result']['worst_case']}",
          flush=True)
    out.update({k: now[k] for k in ("wall_seconds", "load_at_start", "load_at_end", "revision", "result")})
    if a.baseline_tree is not None:
        out["baseline"] = {k: base[k] for k in ("revision", "wall_seconds", "load_at_start", "load_at_end")}
        out["baseline"]["result"] = {k: base["result"].get(k) for k in
                                     ("worst_case", "worst_case_std", "clean_accuracy", "k", "n_examples")}
        out["ratio_wall_seconds"] = round(now["wall_seconds"] / base["wall_seconds"], 3)
        out["ratio_of"] = "this code's wall time / the baseline revision's, same command, same machine, one run each"
        print(f"ratio {out['ratio_wall_seconds']}", flush=True)
    if a.out is not None:
        write_results(a.out, out)
    if a.audit_out is not None:
        au = now["audit"]
        print(f"audit: {au['wall_seconds']} s", flush=True)
        write_results(a.audit_out, {
            "what": "igd audit of the defence the demo pipeline made (its mask, its transfer sets), quick preset",
            "command": out["command"], "audit_command": "igd " + " ".join(AUDIT) + "  (after: igd pipeline --out run)",
            "machine": out["machine"], "date": out["date"], "revision": au["revision"],
            **{k: au[k] for k in ("wall_seconds", "load_at_start", "load_at_end")}, "audit": au["result"]})
    return out


if __name__ == "__main__":
    main()
