"""Same answer whatever the batch size and the shard split: every attack, a randomized demo defence, compared exactly.

    python benchmarks/check_same_answer.py [--quick] [--device cpu] [--attacks aa fab-t ...] [--n-examples 120]
                                           [--out FILE.json] [--workdir DIR]

For each attack ``igd attack`` names, and ``iw-wc``, it runs ``igd defend-eval`` on the demo model's defence three
ways, each in a fresh work folder (nothing reused between them): whole with ``--batch-size 5``, whole with
``--batch-size 64``, and as two shards (``--shard 0/2``, ``--shard 1/2``, batch 64) joined with ``igd merge``.
It compares the three reports exactly: every figure (accuracies, standard deviations, majority votes, per-class
figures: the report's result without its timings) and every per-image decision (the per-draw correctness of every
candidate of every image, the selected rows), not the adversarial points. One verdict line per attack; exit code 1
when any differs, 0 when all agree.

The defences are randomized with noise large enough to matter: a random ranking (``igd rank --method random``)
with ``igd calibrate-k --k 40 --sigma 0.1``, and the same ranking's top-2 neurons at σ = 0.5. Budgets are tiny
(the question is whether the cut changes the answer, not how strong the attacks are). ``--quick``: 12 images,
one defence (k = 40, σ = 0.1), two draws, the smallest budgets: a CPU runs it in a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("IGD_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _data, also when imported as a module

import torch  # noqa: E402

from _data import command_line, write_results  # noqa: E402
from igd_cli.attacks import ATTACKS  # noqa: E402
from igd_cli.cli import main as igd  # noqa: E402

#: every attack ``igd attack`` names, then IW-WC
ALL_ATTACKS = (*ATTACKS, "iw-wc")
#: the defences: name -> (k, σ)
DEFENCES = {"k40-sigma0.1": (40, 0.1), "top2-sigma0.5": (2, 0.5)}
#: tiny budgets (full run, --quick): the flags each attack takes are given, the others left out
BUDGETS = {"full": {"steps": 5, "restarts": 1, "queries": 50, "eot_iter": 2},
           "quick": {"steps": 2, "restarts": 1, "queries": 10, "eot_iter": 2}}
#: what a report's result holds that is not a figure (timings, where things went)
NOT_FIGURES = {"seconds", "sets"}
#: the report's tensors of per-image decisions
DECISIONS = ("correct", "y", "index", "base_draws", "defended_draws")
#: the batch sizes compared and the batch of the shard runs
SMALL_BATCH, BIG_BATCH = 5, 64


class CommandFailed(RuntimeError):
    """An igd command exited non-zero."""


def run_igd(*args: Any) -> dict[str, Any]:
    """``igd ARGS --json`` in this process: its JSON result (CommandFailed with its stderr when it fails)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = igd([str(a) for a in args] + ["--json"])
    if code != 0:
        raise CommandFailed(f"igd {' '.join(map(str, args))}: exit {code}: {err.getvalue().strip()[-400:]}")
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    return json.loads(lines[-1])


def budget_flags(attack: str, budgets: dict[str, int]) -> list[str]:
    """The budget options ``attack`` takes (IW-WC: all of them), at ``budgets``."""
    keys = budgets if attack == "iw-wc" else ATTACKS[attack].defaults
    return [x for key in keys for x in (f"--{key.replace('_', '-')}", str(budgets[key]))]


@dataclass
class Report:
    """One evaluation's figures and per-image decisions."""

    figures: dict[str, Any]
    decisions: dict[str, torch.Tensor]


def read_report(path: Path) -> Report:
    from igd_cli.artifacts import load_artifact

    art = load_artifact(path, kind="eval-report")
    result = {k: v for k, v in (art.meta.get("result") or {}).items() if k not in NOT_FIGURES}
    return Report(result, {k: art.tensors[k] for k in DECISIONS if k in art.tensors})


def differences(a: Report, b: Report) -> list[str]:
    """What differs between two reports: figures by key (both values), decisions by tensor (the images)."""
    out = []
    for key in sorted(set(a.figures) | set(b.figures)):
        if a.figures.get(key) != b.figures.get(key):
            out.append(f"{key}: {_short(a.figures.get(key))} vs {_short(b.figures.get(key))}")
    for name in DECISIONS:
        ta, tb = a.decisions.get(name), b.decisions.get(name)
        if ta is None and tb is None:
            continue
        if ta is None or tb is None or ta.shape != tb.shape:
            out.append(f"{name}: shape {None if ta is None else tuple(ta.shape)} vs "
                       f"{None if tb is None else tuple(tb.shape)}")
        elif not torch.equal(ta, tb):
            diff = (ta != tb).reshape(-1, ta.shape[-1]).any(0).nonzero().flatten().tolist()
            out.append(f"{name}: {len(diff)} image(s) differ (positions {diff[:10]}{' ...' if len(diff) > 10 else ''})")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def headline(r: Report) -> str:
    """The report's main figure, for the verdict line."""
    f = r.figures
    value = f.get("worst_case") if f.get("worst_case") is not None else f.get("robust_accuracy")
    if isinstance(value, dict):
        value = next(iter(value.values()), None)
    return "n/a" if value is None else f"{100 * float(value):.2f} %"


def make_masks(work: Path, device: str, defences: dict[str, tuple[int, float]]) -> dict[str, Path]:
    """The random ranking and one mask per defence (fixed k, σ)."""
    imp = work / "importance-random.safetensors"
    run_igd("rank", "--model", "demo", "--method", "random", "--out", imp, "--device", device)
    masks = {}
    for name, (k, sigma) in defences.items():
        masks[name] = work / f"mask-{name}.safetensors"
        run_igd("calibrate-k", "--model", "demo", "--importance", imp, "--k", k, "--sigma", sigma,
                "--n-examples", 50, "--out", masks[name], "--device", device)
    return masks


def evaluate_three_ways(attack: str, mask: Path, work: Path, *, n: int, device: str, budgets: dict[str, int],
                        draws: int) -> dict[str, Report]:
    """The attack's evaluation at batch 5, at batch 64, and as two shards merged: each in its own work folder."""
    common = ["defend-eval", "--model", "demo", "--mask", mask, "--attack", attack, "--n-examples", n,
              "--device", device, "--draws", draws, "--seed", 0, *budget_flags(attack, budgets)]
    reports = {}
    for bs in (SMALL_BATCH, BIG_BATCH):
        rep = work / f"batch{bs}.safetensors"
        run_igd(*common, "--batch-size", bs, "--workdir", work / f"adv-batch{bs}", "--report", rep)
        reports[f"batch {bs}"] = read_report(rep)
    shards = []
    for i in range(2):
        shards.append(work / f"shard{i}.safetensors")
        run_igd(*common, "--batch-size", BIG_BATCH, "--workdir", work / "adv-shards", "--shard", f"{i}/2",
                "--report", shards[-1])
    merged = work / "shards-merged.safetensors"
    run_igd("merge", *shards, "--out", merged)
    reports["2 shards"] = read_report(merged)
    return reports


def check_attack(attack: str, masks: dict[str, Path], work: Path, *, n: int, device: str, budgets: dict[str, int],
                 draws: int) -> dict[str, Any]:
    """One attack on every defence: the comparisons, the differences, and the verdict."""
    per_defence: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, mask in masks.items():
        folder = work / attack / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            reps = evaluate_three_ways(attack, mask, folder, n=n, device=device, budgets=budgets, draws=draws)
        except CommandFailed as exc:
            per_defence[name] = {"error": str(exc)}
            continue
        small, big, sharded = reps[f"batch {SMALL_BATCH}"], reps[f"batch {BIG_BATCH}"], reps["2 shards"]
        per_defence[name] = {
            "figure": {k: headline(r) for k, r in reps.items()},
            f"batch {SMALL_BATCH} vs batch {BIG_BATCH}": differences(small, big),
            f"2 shards vs batch {BIG_BATCH}": differences(sharded, big)}
    ok = all("error" not in d and not any(v for k, v in d.items() if " vs " in k) for d in per_defence.values())
    return {"attack": attack, "same": ok, "seconds": round(time.perf_counter() - t0, 1), "defences": per_defence}


def verdict(row: dict[str, Any]) -> str:
    """One line: PASS/FAIL, the attack, and per defence its figure or what differs."""
    parts = []
    for name, d in row["defences"].items():
        if "error" in d:
            parts.append(f"{name}: ERROR {d['error']}")
            continue
        diffs = [f"{k}: {'; '.join(v)}" for k, v in d.items() if " vs " in k and v]
        if diffs:
            figs = " / ".join(f"{k} {v}" for k, v in d["figure"].items())
            parts.append(f"{name}: DIFFERS ({figs}) " + " | ".join(diffs))
        else:
            parts.append(f"{name}: same ({d['figure'][f'batch {BIG_BATCH}']})")
    return f"{'PASS' if row['same'] else 'FAIL'} {row['attack']}: " + "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    """The command line (the docs' examples are parsed with it: tests)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 images, one defence, two draws, the smallest budgets")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attacks", nargs="+", default=list(ALL_ATTACKS), choices=list(ALL_ATTACKS), metavar="ATTACK")
    ap.add_argument("--n-examples", type=int, default=None, help="images (default 120; --quick 12)")
    ap.add_argument("--draws", type=int, default=None, help="draws of the randomized scoring (default 5; --quick 2)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON to write")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    n = args.n_examples or (12 if args.quick else 120)
    draws = args.draws or (2 if args.quick else 5)
    budgets = BUDGETS[mode]
    defences = {k: v for k, v in DEFENCES.items() if not args.quick or k == "k40-sigma0.1"}
    tmp = None
    if args.workdir is None:
        tmp = tempfile.mkdtemp(prefix="igd-same-answer-")
    work = Path(args.workdir or tmp)
    work.mkdir(parents=True, exist_ok=True)
    old_home = os.environ.get("IGD_HOME")
    os.environ["IGD_HOME"] = str(work / "igd-home")  # no cache of another run is reused
    rows = []
    try:
        masks = make_masks(work, args.device, defences)
        for attack in args.attacks:
            rows.append(check_attack(attack, masks, work, n=n, device=args.device, budgets=budgets, draws=draws))
            print(verdict(rows[-1]), flush=True)
    finally:
        if old_home is None:
            os.environ.pop("IGD_HOME", None)
        else:
            os.environ["IGD_HOME"] = old_home
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    differ = [r["attack"] for r in rows if not r["same"]]
    print(f"{'FAIL' if differ else 'PASS'} same answer: {len(rows) - len(differ)} of {len(rows)} attacks agree "
          f"(batch {SMALL_BATCH} = batch {BIG_BATCH} = 2 shards, figures and per-image decisions)"
          + (f"; differ: {', '.join(differ)}" if differ else ""), flush=True)
    if args.out is not None:
        result = {"command": command_line("check_same_answer.py", argv),
                  "mode": mode, "device": args.device, "n_examples": n, "draws": draws, "budgets": budgets,
                  "defences": {k: {"k": v[0], "sigma": v[1]} for k, v in defences.items()},
                  "torch": torch.__version__, "attacks": rows, "differ": differ}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_results(args.out, result)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
