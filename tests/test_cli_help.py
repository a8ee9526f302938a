"""Every command's --help teaches: it ends with examples that parse as igd commands, shows no Python type
placeholders, and the options that share a name share a meaning (σ from --eps only where ε sets σ, one
--batch-size default, the evaluating commands' common --n-examples default)."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
import typer
from safetensors.torch import save_file

from igd_cli.cli import app
from igd_cli.commands import register_all
from igd_cli.reference import WIDTH, _commands

#: what Typer prints for an option without a metavar: ``<str>``, ``<int range>``, ``<list[Path]>``, ``<path>``…
PYTHON_TYPE = re.compile(r"<(str|int|float|bool|path|list|tuple|dict|text|integer)\b[^>]*>|list\[|Path\]|<class")


def _all_commands() -> list[tuple[str, object]]:
    register_all()
    return _commands(typer.main.get_command(app), "igd")


def _help(cmd, full: str, width: int = WIDTH) -> str:
    ctx = cmd.context_class(cmd, info_name=full, terminal_width=width, max_content_width=width)
    return cmd.get_help(ctx)


def _examples(text: str) -> list[str]:
    """The ``igd …`` lines after the help's ``Examples:`` line."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "Examples:")
    return [ln.strip() for ln in lines[start + 1:] if ln.strip().startswith("igd ")]


COMMANDS = [full for full, _ in _all_commands()]


def test_every_command_is_covered():
    assert {"igd rank", "igd calibrate-k", "igd attack", "igd defend-eval", "igd pipeline", "igd audit",
            "igd analyze", "igd analyze shift", "igd analyze ablation", "igd analyze sweep", "igd report",
            "igd merge", "igd inspect", "igd layers", "igd fetch"} <= set(COMMANDS)


def test_igd_help_shows_where_to_start(cli):
    r = cli("--help")
    assert r.code == 0 and _examples(r.out) == ["igd pipeline --model demo --preset quick --n-examples 50 --out runs/demo",
                                               "igd rank --help"]


@pytest.mark.parametrize("full", COMMANDS)
@pytest.mark.parametrize("width", [80, WIDTH])
def test_help_has_no_python_type_placeholders(full, width):
    cmd = dict(_all_commands())[full]
    text = _help(cmd, full, width)
    assert not PYTHON_TYPE.search(text), PYTHON_TYPE.search(text).group(0)


def test_the_placeholder_check_can_fail():
    """What the check above catches: Typer's rendering of an option without a metavar."""
    probe = typer.Typer(rich_markup_mode=None)

    @probe.command()
    def f(files: list[str] = typer.Option(..., "--file"), n: int = typer.Option(1, "--n", min=1)) -> None:
        """probe"""

    cmd = typer.main.get_command(probe)
    text = _help(cmd, "probe")
    assert PYTHON_TYPE.search(text)


@pytest.mark.parametrize("full", COMMANDS)
def test_help_ends_with_examples_that_parse(full):
    """One or two examples per command, each one line starting with ``igd ``, whose words click parses for the
    command they name (unknown options, missing required ones, bad values all fail here); the examples run on the
    demo model except those marked ``# needs …`` (a download, a GPU, a file to make first)."""
    root = typer.main.get_command(app)
    cmd = dict(_all_commands())[full]
    text = _help(cmd, full)
    examples = _examples(text)
    assert 1 <= len(examples) <= 2, examples
    assert text.rstrip().splitlines()[-1].strip() == examples[-1]  # the examples end the help
    for line in examples:
        words = shlex.split(line, comments=True)
        assert words[0] == "igd"
        group, args, name = root, words[1:], "igd"
        while getattr(group, "commands", None) and args and args[0] in group.commands:
            group, name, args = group.commands[args[0]], f"{name} {args[0]}", args[1:]
        if full != "igd merge":  # merge's first example makes the second shard
            assert name.startswith(full), (full, line)
        group.make_context(name, list(args), resilient_parsing=False)  # raises on a usage error
        if "# needs" not in line:
            assert "--model demo" in line or name in ("igd report", "igd merge", "igd inspect", "igd analyze",
                                                       "igd analyze shift", "igd analyze sweep",
                                                       "igd analyze ablation"), line


def _eps_help(full: str) -> str:
    cmd = dict(_all_commands())[full]
    return next(p.help for p in cmd.params if "--eps" in p.opts)


@pytest.mark.parametrize("full, sets_sigma", [
    ("igd calibrate-k", True), ("igd pipeline", True), ("igd analyze ablation", True), ("igd analyze sweep", True),
    ("igd attack", False), ("igd defend-eval", False), ("igd analyze shift", False), ("igd audit", False)])
def test_eps_help_says_sigma_only_where_eps_sets_it(full, sets_sigma):
    assert ("σ = ε/2" in _eps_help(full)) == sets_sigma


def test_eps_sets_sigma_in_calibrate_k_and_not_in_defend_eval(cli, tmp_path, igd_home):
    """What the help says, done: calibrate-k's --eps sets σ = ε/2; defend-eval's --eps leaves the mask's σ."""
    imp, mask = tmp_path / "imp.safetensors", tmp_path / "mask.safetensors"
    assert cli("rank", "--model", "demo", "--method", "random", "--out", imp).code == 0
    r = cli("calibrate-k", "--model", "demo", "--importance", imp, "--k", 16, "--eps", "0.3", "--n-examples", 20,
            "--out", mask, "--json")
    assert r.code == 0, r.err
    r = cli("defend-eval", "--model", "demo", "--mask", mask, "--eps", "0.05", "--n-examples", 20, "--json")
    assert r.code == 0, r.err
    assert r.json()["defense"]["sigma"] == pytest.approx(0.15)


def test_pipeline_probe_dataset_help_names_no_split_option():
    cmd = dict(_all_commands())["igd pipeline"]
    assert not any("--split" in p.opts for p in cmd.params)
    probe = next(p.help for p in cmd.params if "--probe-dataset" in p.opts)
    assert "--split" not in probe and "training split" in probe


def test_audit_help_promises_no_l2():
    """The audit's attacks include l-inf-only ones (RayS, PGD, FGSM, the loss surface): no --threat-model, and
    --eps says so instead of offering l2."""
    cmd = dict(_all_commands())["igd audit"]
    assert not any("--threat-model" in p.opts for p in cmd.params)
    assert "l2" not in _eps_help("igd audit") and "l-inf only" in _eps_help("igd audit")


def test_shared_options_share_their_defaults():
    """--batch-size has one default everywhere (results do not depend on it: docs/same-answer.md); --out is a
    FILE where a command writes one artifact and a DIR where it writes a run folder."""
    sizes, outs = set(), {}
    for full, cmd in _all_commands():
        for p in getattr(cmd, "params", []):
            if "--batch-size" in p.opts:
                sizes.add(int(p.default))  # "128" where --batch-size also takes auto
            if "--out" in p.opts:
                outs[full] = p.metavar
    assert sizes == {128}
    assert {c for c, m in outs.items() if m == "DIR"} == {"igd pipeline", "igd audit", "igd analyze shift",
                                                         "igd analyze ablation", "igd analyze sweep"}
    assert set(outs.values()) == {"FILE", "DIR"}


def test_evaluating_commands_default_to_the_first_1000_images(cli, tmp_path, igd_home):
    """attack and defend-eval, like calibrate-k and the pipeline's paper preset, take the first 1000 images of a
    larger set when --n-examples is not given."""
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "digits-1003.safetensors"
    save_file({"x": torch.randint(0, 256, (1003, 1, 8, 8), generator=g, dtype=torch.uint8),
               "y": torch.randint(0, 10, (1003,), generator=g)}, str(data),
              metadata={"classes": '["0","1","2","3","4","5","6","7","8","9"]'})
    r = cli("attack", "--model", "demo", "--dataset", data, "--attack", "fgsm", "--out", tmp_path / "adv.safetensors",
            "--json")
    assert r.code == 0, r.err
    assert r.json()["n_examples"] == 1000
    imp, mask = tmp_path / "imp.safetensors", tmp_path / "mask.safetensors"
    assert cli("rank", "--model", "demo", "--method", "random", "--out", imp).code == 0
    assert cli("calibrate-k", "--model", "demo", "--importance", imp, "--k", 16, "--no-rs", "--n-examples", 20,
               "--out", mask).code == 0
    r = cli("defend-eval", "--model", "demo", "--dataset", data, "--mask", mask, "--json")
    assert r.code == 0, r.err
    assert r.json()["n_examples"] == 1000
    r = cli("defend-eval", "--model", "demo", "--dataset", data, "--mask", mask, "--n-examples", 1003, "--json")
    assert r.code == 0 and r.json()["n_examples"] == 1003
