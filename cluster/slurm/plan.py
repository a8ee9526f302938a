"""Turn ``igd pipeline`` options into the commands of the SLURM route (used by ``cluster/slurm/submit.sh``).

``python cluster/slurm/plan.py RUN_DIR SHARDS -- <igd pipeline options>`` parses the options with igd pipeline's
own parser (so a misspelt option fails here, on the login node, not in a job), applies the ``--preset``
defaults the way ``igd pipeline`` does, resolves the masked layer(s), the neuron count and the images (with ``--defense``: builds the
defence once, and there is no ranking or calibration to plan), and writes
``RUN_DIR/cluster/plan.json`` and ``RUN_DIR/cluster/pipeline.args`` (the options, one per line, that every job
passes to ``igd pipeline``).

Every job runs ``igd pipeline <the same options> --out RUN_DIR --piece PIECE`` (igd_cli/pipeline.py ``Piece``): the
pipeline computes each piece under its own identities, and the final plain ``igd pipeline --json`` merges them, so
``RUN_DIR/result.json`` is the object ``igd pipeline`` prints. This file only checks the options on the login
node and says how many pieces there are.
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

    from igd_cli.calibrate import DEFAULT_N_EXAMPLES
    from igd_cli.cli import app
    from igd_cli.commands import register_all
    from igd_cli.common import model_input_shape, open_target, resolve_model_layer
    from igd_cli.errors import IgdError
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
    if p["attack"] not in ("iw-wc", "aa"):
        fail(f"--attack {p['attack']}: the pipeline evaluates iw-wc or aa")
    if p["piece"]:
        fail("--piece: the driver submits the pieces itself")
    own = p.get("defense_spec")  # a user's defence: no ranking, no calibration (igd pipeline --defense)
    try:
        target = open_target(p["model"], p["arch"], p["dataset"], p["threat_model"], "cpu", p["zoo_dataset"],
                             normalize=p["normalize"])
        if own is not None:  # built here once, so that a broken defence file fails on the login node
            from igd_cli import contract

            contract.build_defense(own, target.model)
            layers = []
        else:
            shape = model_input_shape(target.loaded, None, p["probe_dataset"] or p["dataset"], p["data_dir"])
            layers = [resolve_model_layer(target, name, tuple(shape)) for name in (p["layer"] or [None])]
        pre = preset_values(p["preset"], target.loaded.name)
        n_examples = p["n_examples"] if p["n_examples"] is not None else pre["n_examples"]
        if n_examples is None:
            n_examples = min(DEFAULT_N_EXAMPLES, len(target.data("test", None, p["data_dir"])))
    except IgdError as exc:
        fail(str(exc))
    if shards > n_examples:
        fail(f"--shards {shards}: more shards than the {n_examples} evaluation images")
    n_neurons = layers[0][1] if layers else 0
    # one masked layer: its neurons in array tasks; several: the ranking is one job (igd pipeline --piece rank)
    rank_shards = min(shards, n_neurons) if len(layers) == 1 else 0
    return {"run": str(run.resolve()), "shards": shards, "rank_shards": rank_shards, "n_neurons": n_neurons,
            "layer": "+".join(name for name, _ in layers), "n_examples": n_examples, "transfer": "yes",
            "defense": "no" if own is None else "yes",
            "preset": pre["preset"], "options": list(opts), "args": {"pipeline": list(opts)}}


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
    print(json.dumps({k: new[k] for k in ("rank_shards", "n_neurons", "layer", "n_examples", "transfer", "defense")}))


if __name__ == "__main__":
    main(sys.argv[1:])
