"""igd pipeline --piece: a run cut into pieces (ranking rows, calibration, transfer and defended shards), run in any
order and then merged by a plain run, gives the figures of one plain run (the cluster route's contract)."""

from __future__ import annotations

import pytest
import torch

import igd_cli.attacks.base as attacks_base
import igd_cli.evaluate as evaluate
from igd_cli.artifacts import load_artifact
from igd_cli.errors import IgdError
from igd_cli.pipeline import parse_piece

OPTS = ["--n-probe", "80", "--n-examples", "9", "--attack", "iw-wc", "--steps", "2", "--queries", "12",
        "--eot-iter", "2", "--batch-size", "4", "--draws", "3", "--json"]
#: the figures of `igd pipeline --json` (not the bookkeeping: stages, paths, seconds)
FIGURES = ("n_examples", "clean_accuracy", "clean_accuracy_std", "base_clean_accuracy", "robust_accuracy",
           "robust_accuracy_std", "base_robust_accuracy", "worst_case", "worst_case_std", "worst_case_majority",
           "worst_case_all_draws", "base_worst_case", "draws", "protocol", "randomized", "measured_on_survivors",
           "eps", "mode", "k", "n_neurons", "layer", "calibration", "probe")


def _forbid_attacks(monkeypatch) -> None:
    """From here on any attack fails the test: a merging run must reuse the pieces' sets and reports."""
    def boom(*a, **k):
        raise AssertionError("the merging run attacked: the pieces should have been merged")

    monkeypatch.setattr(evaluate, "run_attack", boom)
    monkeypatch.setattr(attacks_base, "run_attack", boom)


def test_pieces_then_a_plain_run_equal_one_plain_run(tmp_path, cli, monkeypatch):
    plain = cli("pipeline", *OPTS, "--out", tmp_path / "plain")
    assert plain.code == 0, plain.err
    want = plain.json()
    run = tmp_path / "pieces"
    pieces = ["transfer:1/3", "rank:64:128", "transfer:0/3", "rank:0:64", "calibrate", "transfer:2/3",
              "defend:2/3", "defend:0/3", "defend:1/3"]  # the transfer shards need no ranking: run first
    for p in pieces:
        r = cli("pipeline", *OPTS, "--out", run, "--piece", p)
        assert r.code == 0, (p, r.err)
        assert r.json()["piece"] == p.replace(":", "-").replace("/", "-of-")
    assert sorted(q.name for q in (run / "adv").iterdir()) == ["shard-0-of-3", "shard-1-of-3", "shard-2-of-3"]

    _forbid_attacks(monkeypatch)
    merged = cli("pipeline", *OPTS, "--out", run)
    assert merged.code == 0, merged.err
    got = merged.json()
    assert got["stages"]["rank"] == "reused" and got["stages"]["defend-eval"] == "reused"
    for key in FIGURES:
        assert got[key] == want[key], key
    assert 0 < want["worst_case"] < want["clean_accuracy"]  # some images broken, some not
    for key in ("importance", "mask"):
        a, b = (load_artifact(j["paths"][key]) for j in (want, got))
        assert set(a.tensors) == set(b.tensors) and all(torch.equal(a[t], b[t]) for t in a.tensors), key


def test_bad_pieces_are_one_error_line(tmp_path, cli):
    for bad in ("rank:5", "rank:9:3", "defend:3/3", "transfer", "evaluate:0/1", "calibrate:1"):
        with pytest.raises(IgdError, match="--piece"):
            parse_piece(bad)
    r = cli("pipeline", *OPTS, "--out", tmp_path / "r", "--piece", "rank:0:999")
    assert r.code == 2 and "N = 128" in r.err and len(r.err.strip().splitlines()) == 1


def _error(r) -> str:
    """The one error line (after the stages' progress lines on stderr)."""
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.err.strip().splitlines()[-1] == errors[0], r.err
    return errors[0]


def test_merge_piece_refuses_missing_or_corrupted_pieces(tmp_path, cli):
    run = tmp_path / "run"
    for p in ("calibrate", "defend:0/2"):
        assert cli("pipeline", *OPTS, "--out", run, "--piece", p).code == 0
    r = cli("pipeline", *OPTS, "--out", run, "--piece", "merge")
    assert r.code == 2 and "incomplete (1 of 2 found" in _error(r)
    assert cli("pipeline", *OPTS, "--out", run, "--piece", "defend:1/2").code == 0
    (piece,) = (run / "pieces").glob("eval-*.shard-1-of-2.safetensors")
    raw = bytearray(piece.read_bytes())
    raw[-2] ^= 0x01  # a flipped bit in the tensors, the header intact
    piece.write_bytes(bytes(raw))
    r = cli("pipeline", *OPTS, "--out", run, "--piece", "merge")
    assert r.code == 2 and "corrupted" in _error(r)
    r = cli("pipeline", *OPTS, "--out", run, "--piece", "defend:1/2")  # the piece refuses to overwrite it silently
    assert r.code == 2 and "corrupted" in _error(r)
    piece.unlink()
    assert cli("pipeline", *OPTS, "--out", run, "--piece", "defend:1/2").code == 0
    r = cli("pipeline", *OPTS, "--out", run, "--piece", "merge")
    assert r.code == 0, r.err
    assert cli("pipeline", *OPTS, "--out", run).json()["stages"]["defend-eval"] == "reused"


def test_several_layers_pieces_equal_one_plain_run(tmp_path, cli, monkeypatch):
    """Two masked layers: the cluster route's pieces (the ranking one job, as plan.py plans it; calibration; transfer
    and defended shards) merged by a plain run give every figure, k per layer and the mask of one plain run."""
    opts = [*OPTS, "--layer", "block2", "--layer", "block3"]
    plain = cli("pipeline", *opts, "--out", tmp_path / "plain")
    assert plain.code == 0, plain.err
    want = plain.json()
    assert set(want["k"]) == {"block2", "block3"}, want["k"]
    run = tmp_path / "pieces"
    for p in ("transfer:1/2", "rank", "transfer:0/2", "calibrate", "defend:1/2", "defend:0/2", "merge"):
        r = cli("pipeline", *opts, "--out", run, "--piece", p)
        assert r.code == 0, (p, r.err)

    _forbid_attacks(monkeypatch)
    got = cli("pipeline", *opts, "--out", run)
    assert got.code == 0, got.err
    got = got.json()
    for key in FIGURES:
        assert got[key] == want[key], key
    assert len(want["paths"]["importance"]) == 2  # one ranking per layer
    for key in ("importance", "mask"):
        paths = {j is want: j["paths"][key] for j in (want, got)}
        pairs = zip(*(p if isinstance(p, list) else [p] for p in paths.values()))
        for pa, pb in pairs:
            a, b = load_artifact(pa), load_artifact(pb)
            assert set(a.tensors) == set(b.tensors), key
            assert all(torch.equal(a[t], b[t]) for t in a.tensors), key


def test_the_piece_help_names_every_form_the_parser_takes():
    """``igd pipeline --help`` lists every ``--piece`` form parse_piece accepts (its error line names them all)."""
    import re

    import typer

    from igd_cli.cli import app
    from igd_cli.commands import register_all

    register_all()
    with pytest.raises(IgdError) as e:
        parse_piece("nonsense")
    forms = re.split(r", | or ", str(e.value).split("expected ", 1)[1])
    assert len(forms) == 6
    option = next(p for p in typer.main.get_command(app).commands["pipeline"].params if p.name == "piece")
    for form in forms:
        assert re.search(rf"(?<![\w:]){re.escape(form)}(?![\w:])", option.help), form
        parse_piece(form.replace("A:B", "0:4").replace("I/N", "0/2"))  # and each parses as shown
