"""Turn ``igd pipeline`` options into the commands of the SLURM route (used by ``cluster/slurm/submit.sh``).

``python cluster/slurm/plan.py RUN_DIR SHARDS -- <igd pipeline options>`` parses the options with igd pipeline's
own parser (so a misspelt option fails here, on the login node, not in a job), applies the ``--preset``
defaults the way ``igd pipeline`` does, resolves the masked layer and its neuron count, and writes
``RUN_DIR/cluster/plan.json`` and one ``RUN_DIR/cluster/<step>.args`` file (one argument per line) per step.

The mapping from pipeline options to the step commands lives here and only here; it is the piece that the
pipeline's own piece mechanism (``igd pipeline --piece``) is meant to replace.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: pipeline options the cluster route cannot honour yet, with what to do instead
UNSUPPORTED = {"force": "remove RUN_DIR (or the artifacts to recompute) instead of --force",
               "out": "RUN_DIR is the run folder: drop --out"}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def plan(run: Path, shards: int, opts: list[str]) -> dict:
    import typer

    from igd_cli.attacks import attack_class
    from igd_cli.cli import app
    from igd_cli.commands import register_all
    from igd_cli.common import model_input_shape, open_target, resolve_model_layer
    from igd_cli.errors import IgdError
    from igd_cli.evaluate import TRANSFER
    from igd_cli.pipeline import preset_values

    register_all()
    cmd = typer.main.get_command(app).commands["pipeline"]
    try:
        p = cmd.make_context("igd pipeline", list(opts)).params
    except Exception as exc:  # click usage errors: one line
        fail(f"igd pipeline options: {' '.join(str(exc).split())}")
    for key, why in UNSUPPORTED.items():
        if p.get(key):
            fail(f"--{key.replace('_', '-')}: {why}")
    if len(p["layer"]) > 1:
        fail("several --layer: the cluster route masks one layer (run igd pipeline for several)")
    if p["attack"] not in ("iw-wc", "aa"):
        fail(f"--attack {p['attack']}: the pipeline evaluates iw-wc or aa")
    try:
        target = open_target(p["model"], p["arch"], p["dataset"], p["threat_model"], "cpu", p["zoo_dataset"],
                             normalize=p["normalize"])
        shape = model_input_shape(target.loaded, None, p["probe_dataset"] or p["dataset"], p["data_dir"])
        layer, n_neurons = resolve_model_layer(target, p["layer"][0] if p["layer"] else None, tuple(shape))
        pre = preset_values(p["preset"], target.loaded.name)
    except IgdError as exc:
        fail(str(exc))

    def pick(key):
        return p[key] if p[key] is not None else pre[key]

    n_examples = pick("n_examples")
    budgets = {key: pick(key) for key in ("steps", "restarts", "queries", "eot_iter")}

    def opt(name, value):
        return [] if value is None or value is False else [f"--{name}"] if value is True else [f"--{name}", str(value)]

    common = []
    for key in ("model", "arch", "normalize", "dataset", "data_dir", "threat_model", "zoo_dataset", "device",
                "seed", "batch_size"):
        common += opt(key.replace("_", "-"), p[key])
    run = run.resolve()
    rank = [*common, *opt("layer", layer), *opt("method", p["method"]), *opt("n-probe", p["n_probe"]),
            *opt("probe-dataset", p["probe_dataset"]), *opt("clip-model", p["clip_model"]),
            *opt("clip-pretrained", p["clip_pretrained"])]
    calibrate = [*common, "--importance", str(run / "importance.safetensors"), *opt("n-examples", n_examples),
                 *opt("tolerance", p["tolerance"]), *opt("eps", p["eps"]), *opt("no-rs", p["no_rs"]),
                 *[a for k in p["k"] for a in ("--k", k)], "--out", str(run / "mask.safetensors")]
    scoring = [*opt("draws", p["draws"]), *opt("protocol", p["protocol"])]
    # IW-WC evaluates the transfer sets of the base model as columns (--adv RUN/adv); aa has none (its base column
    # is the base model's own AutoAttack, computed by the evaluation like igd pipeline does)
    transfer = list(TRANSFER) if p["attack"] == "iw-wc" else []
    attacks = {}
    for name in transfer:  # only the budgets an attack takes (igd attack refuses the others)
        takes = attack_class(name).defaults
        attacks[name] = [*common, "--attack", name, *opt("n-examples", n_examples), *opt("eps", p["eps"]),
                         *[a for k, v in budgets.items() if k in takes for a in opt(k.replace("_", "-"), v)],
                         *scoring]
    evaluate = [*common, "--mask", str(run / "mask.safetensors"), "--attack", p["attack"],
                *(["--adv", str(run / "adv")] if transfer else []), *opt("n-examples", n_examples), *opt("eps", p["eps"]),
                *[a for k, v in budgets.items() for a in opt(k.replace("_", "-"), v)], *scoring]
    if n_examples is not None and shards > n_examples:
        fail(f"--shards {shards}: more shards than the {n_examples} evaluation images")
    return {"run": str(run), "shards": shards, "rank_shards": min(shards, n_neurons),
            "n_neurons": n_neurons, "layer": layer, "n_examples": n_examples, "transfer": transfer,
            "preset": pre["preset"], "budgets": budgets, "options": list(opts),
            "args": {"rank": rank, "calibrate": calibrate, "evaluate": evaluate,
                     **{f"attack-{name}": a for name, a in attacks.items()}}}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or (len(argv) > 2 and argv[2] != "--"):
        fail("usage: plan.py RUN_DIR SHARDS -- <igd pipeline options>")
    run, shards, opts = Path(argv[0]), int(argv[1]), argv[3:]
    if shards < 1:
        fail(f"--shards {shards}: at least 1")
    new = plan(run, shards, opts)
    folder = run / "cluster"
    folder.mkdir(parents=True, exist_ok=True)
    old_path = folder / "plan.json"
    if old_path.exists():  # a run folder holds one run: its shards are only reused for the same options
        old = json.loads(old_path.read_text())
        if old.get("options") != new["options"] or old.get("shards") != new["shards"]:
            fail(f"{run} holds a run with other options or shards ({' '.join(old.get('options', []))} "
                 f"--shards {old.get('shards')}): use another RUN_DIR or remove it")
    for step, args in new["args"].items():
        (folder / f"{step}.args").write_text("".join(a + "\n" for a in args))
    tmp = folder / ".plan.json.tmp"
    tmp.write_text(json.dumps(new, indent=1) + "\n")
    tmp.replace(old_path)
    print(json.dumps({k: new[k] for k in ("rank_shards", "n_neurons", "layer", "n_examples", "transfer")}))


if __name__ == "__main__":
    main(sys.argv[1:])
