"""One meaning per option across igd's commands, read from the Typer app itself: counts are at least 1, ``--out``
is a FILE where a command writes one artifact and a DIR where it writes several (plots go there, or to
calibrate-k's one ``--plot FILE``), every ``--batch-size`` takes ``auto``, and the shared options of
docs/artifacts.md are on exactly the commands that page names for them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from igd_cli.cli import app
from igd_cli.commands import register_all
from igd_cli.reference import _commands

ROOT = Path(__file__).resolve().parents[1]

#: counts of things: 0 would run nothing (or divide by zero); shown as ``[x>=1]`` in every --help
COUNTS = ("--n-examples", "--n-probe", "--n-calibration", "--steps", "--restarts", "--queries", "--eot-iter",
          "--draws", "--n-smooth")
#: what --out is, per command: one artifact (FILE) or a folder of several (DIR)
OUT = {"igd rank": "FILE", "igd calibrate-k": "FILE", "igd attack": "FILE", "igd defend-eval": "FILE",
       "igd merge": "FILE", "igd report": "FILE", "igd pipeline": "DIR", "igd audit": "DIR",
       "igd analyze ablation": "DIR", "igd analyze shift": "DIR", "igd analyze sweep": "DIR"}


def _options() -> dict[str, dict[str, object]]:
    register_all()
    return {name: {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}
            for name, cmd in _commands(typer.main.get_command(app), "igd") if hasattr(cmd, "params")}


def test_counts_are_at_least_one_everywhere():
    bad = [(cmd, o) for cmd, opts in _options().items() for o in COUNTS if o in opts and opts[o].min != 1]
    assert not bad, f"counts without min=1: {bad}"


def test_out_is_a_file_for_one_artifact_and_a_folder_for_several():
    opts = _options()
    have = {cmd: o["--out"].metavar for cmd, o in opts.items() if "--out" in o}
    assert have == OUT
    # plots: into --out DIR, or calibrate-k's single --plot FILE; no third way
    plots = {cmd for cmd, o in opts.items() if any("plot" in name for name in o)}
    assert plots == {"igd calibrate-k", "igd audit"}  # audit's --plot-dir is its --out's older spelling
    assert opts["igd audit"]["--plot-dir"] is opts["igd audit"]["--out"]
    assert opts["igd defend-eval"]["--report"] is opts["igd defend-eval"]["--out"]


def test_every_batch_size_takes_auto():
    bad = [cmd for cmd, o in _options().items() if "--batch-size" in o and o["--batch-size"].metavar != "N|auto"]
    assert not bad


def _artifacts_table() -> dict[str, set[str]]:
    """docs/artifacts.md's shared options: option -> the commands it names in the "commands" column."""
    page = (ROOT / "docs" / "artifacts.md").read_text()
    section = page.split("## Options every command shares", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(r"`(--[a-z-]+)", cells[0])
        if m:
            out[m.group(1)] = {f"igd {c}" for c in re.findall(r"`([a-z-]+(?: [a-z]+)?)`", cells[-1])}
    return out


def test_the_shared_options_are_where_the_page_says():
    table = _artifacts_table()
    assert {"--model", "--split", "--threat-model", "--seed", "--batch-size", "--numerics", "--json"} <= set(table)
    opts = _options()
    for opt, cmds in table.items():
        have = {cmd for cmd, o in opts.items() if opt in o and cmd != "igd analyze"}
        assert have == cmds, f"{opt}: on {sorted(have)}, docs/artifacts.md says {sorted(cmds)}"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_zero_count_is_refused_by_the_parser(value):
    from typer.testing import CliRunner

    register_all()
    r = CliRunner().invoke(app, ["attack", "--model", "demo", "--attack", "apgd-ce", "--steps", value, "--out", "x"])
    assert r.exit_code == 2 and "--steps" in r.output
