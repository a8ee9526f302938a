"""Masking the last block alone vs the last two blocks (the paper's open question 2), measured the same way for both:
same model, same images, same ε and attack budgets, the same transfer sets (made once on the base model), and the
scoring igd uses for randomized defences (``igd defend-eval --draws R``: mean ± std over R noise draws, METHOD.md
"Scoring a randomized defence").

Settings (each runs ``igd rank`` per layer, ``igd calibrate-k`` once per layer set, then ``igd defend-eval --attack
iw-wc --draws R`` per mask, all in this process through ``igd_cli.cli.main`` with ``--json``):

- ``demo``: the embedded digits CNN, ``block3`` vs ``block2 + block3``, LO-IR on all 1347 training digits, the first
  200 test digits, ε = 0.2 (the model's own), quick budgets (20 steps, 1 restart, 1000 queries, 5 EoT samples).
- ``resnet18``: pyautoattack's standard-trained CIFAR-10 ResNet-18, ``layer4`` vs ``layer3 + layer4``, LO-IR on the
  first 256 images of ``cifar10-train-4660``, the first 64 of ``cifar10-test-846``, ε = 1/255 (σ = 0.5/255; at
  8/255 every image of this model falls to the transfer sets), 10 steps, 1 restart, 300 queries, 2 EoT samples.

calibrate-k picks k per mask (two layers: the same fraction k/N in both). Prints one Markdown table per setting
(ready for the README) and writes the raw results to ``--out`` (JSON).

    python benchmarks/bench_layers.py [--settings demo resnet18] [--draws 5] [--workdir /tmp/igd-layers]
                                      [--out benchmarks/results/layers-cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _data import add_data_dir, data_file, write_results  # noqa: E402
from igd_cli.cli import main as igd  # noqa: E402


class DataFile(str):
    """A data file's name in a setting, resolved in ``--data-dir`` when the setting runs."""


def resnet18_path() -> str:
    import pyautoattack

    return str(Path(pyautoattack.__file__).parent / "examples" / "model_test.pt")


#: setting -> model arguments, probe arguments, evaluation arguments, (last block, the one before)
SETTINGS = {
    "demo": {"model": ["--model", "demo"], "probe": [], "eval": ["--n-examples", "200"],
             "budgets": ["--steps", "20", "--restarts", "1", "--queries", "1000", "--eot-iter", "5"],
             "layers": ("block3", "block2")},
    "resnet18": {"model": ["--model", resnet18_path, "--arch", "resnet18"],
                 "probe": ["--dataset", DataFile("cifar10-train-4660.safetensors"), "--n-probe", "256"],
                 "eval": ["--dataset", DataFile("cifar10-test-846.safetensors"), "--n-examples", "64",
                          "--eps", "1/255"],
                 "budgets": ["--steps", "10", "--restarts", "1", "--queries", "300", "--eot-iter", "2"],
                 "layers": ("layer4", "layer3")},
}


def call(*args: str) -> dict:
    """``igd ARGS --json`` in this process; the one JSON object it prints, or SystemExit with its error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = igd([str(a) for a in (*args, "--json")])
    if code != 0:
        raise SystemExit(f"igd {' '.join(map(str, args))} failed ({code}): {err.getvalue().strip()[-500:]}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def run_setting(name: str, workdir: Path, draws: int, data_dir: Path | None = None) -> dict:
    s = {k: [str(data_file(v, data_dir)) if isinstance(v, DataFile) else v for v in a] if isinstance(a, list) else a
         for k, a in SETTINGS[name].items()}
    model = [v() if callable(v) else v for v in s["model"]]
    last, before = s["layers"]
    wd = workdir / name
    wd.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    imps = {}
    for layer in (last, before):
        imps[layer] = wd / f"importance-{layer}.safetensors"
        call("rank", *model, *s["probe"], "--layer", layer, "--method", "lo-ir", "--out", imps[layer])
    rows = []
    for layers in ((last,), (before, last)):
        tag = "+".join(layers)
        mask = wd / f"mask-{tag}.safetensors"
        cal = call("calibrate-k", *model, *s["eval"], *[a for layer in layers for a in ("--importance", imps[layer])],
                   "--out", mask)
        ev = call("defend-eval", *model, *s["eval"], "--mask", mask, "--attack", "iw-wc", *s["budgets"],
                  "--workdir", wd / "adv", "--draws", draws)
        rows.append({"layers": list(layers), "k": cal["k"], "n_neurons": cal["n_neurons"],
                     "calibration_clean": cal["clean_accuracy"], "base_clean": ev["base_clean_accuracy"],
                     "evaluation": ev})
    return {"setting": name, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
            "load_avg": os.getloadavg(), "draws": draws}


def fmt(ev: dict, key: str) -> str:
    v = ev.get(key)
    if v is None:
        return "—"
    std = ev.get(f"{key}_std")
    return f"{100 * v:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def markdown(res: dict) -> str:
    ev0 = res["rows"][0]["evaluation"]
    lines = [f"{res['setting']}: {ev0['n_examples']} images, ε = {ev0.get('eps', 0):.4g}, "
             f"R = {res['draws']} draws (mean ± std over the final draws)",
             "", "| masked layers | k (of N) | clean | IW-WC | IW-WC majority | IW-WC all draws |",
             "|---|---|---|---|---|---|",
             f"| none (base model) | — | {100 * ev0['base_clean_accuracy']:.2f} | "
             f"{fmt(ev0, 'base_worst_case')} | — | — |"]
    for row in res["rows"]:
        ev = row["evaluation"]
        ks = row["k"] if isinstance(row["k"], dict) else {row["layers"][0]: row["k"]}
        ns = row["n_neurons"] if isinstance(row["n_neurons"], dict) else {row["layers"][0]: row["n_neurons"]}
        kk = ", ".join(f"{ks[layer]} of {ns[layer]}" for layer in row["layers"])
        lines.append(f"| {' + '.join(row['layers'])} | {kk} | {fmt(ev, 'clean_accuracy')} | {fmt(ev, 'worst_case')} "
                     f"| {fmt(ev, 'worst_case_majority')} | {fmt(ev, 'worst_case_all_draws')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--draws", type=int, default=5, help="noise draws per candidate (METHOD.md: R = 5)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/igd-layers"))
    ap.add_argument("--out", type=Path, default=None, help="write the raw results here (JSON)")
    add_data_dir(ap)
    args = ap.parse_args()
    os.environ.setdefault("IGD_NO_PROGRESS", "1")
    results = [run_setting(name, args.workdir, args.draws, args.data_dir) for name in args.settings]
    for res in results:
        print(markdown(res) + f"\n\n({res['seconds']} s, load average {res['load_avg'][0]:.2f})\n")
    if args.out is not None:
        write_results(args.out, results, args.data_dir)


if __name__ == "__main__":
    main()
