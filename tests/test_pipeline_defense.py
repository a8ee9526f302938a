"""``igd pipeline --defense FILE.py:NAME``: a user's defence through the cached run, its pieces and merge.

The run's figures are checked against ``igd defend-eval --defense`` with the same budgets (an independent path
to the same evaluation), and the cache against an edited source, IG-Defense's options and the rank pieces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "defenses"
TINY = ["--n-examples", "8", "--steps", "2", "--restarts", "1", "--queries", "20", "--eot-iter", "2", "--draws", "3"]


def spec(name: str, folder: Path = EXAMPLES) -> str:
    return f"{folder / name}.py:{name}"


FIGURES = ("clean_accuracy", "robust_accuracy", "worst_case", "iw_wc_paper", "base_worst_case", "draws", "randomized")


def test_the_run_is_defend_eval_and_a_second_run_reuses_it(cli, tmp_path, igd_home):
    """The pipeline of a user's defence gives defend-eval's figures; a second run reads them back."""
    run = cli("pipeline", "--model", "demo", "--defense", spec("smoothing"), *TINY, "--out", tmp_path / "run",
              "--json")
    assert run.code == 0, run.err
    r = run.json()
    assert r["stages"] == {"transfer": "computed", "defend-eval": "computed"}
    assert r["k"] is None and r["paths"]["mask"] is None and r["defense"]["callable"] == "smoothing"
    assert r["defense"]["randomized"] is True and r["randomized"] is True and r["draws"] == 3
    assert r["defense_label"] and "adaptive" in r["robust_accuracy"]
    ev = cli("defend-eval", "--model", "demo", "--defense", spec("smoothing"), "--attack", "iw-wc", *TINY,
             "--workdir", tmp_path / "adv", "--json")
    assert ev.code == 0, ev.err
    e = ev.json()
    for key in FIGURES:
        assert r[key] == e[key], key
    again = cli("pipeline", "--model", "demo", "--defense", spec("smoothing"), *TINY, "--out", tmp_path / "run",
                "--json")
    assert again.code == 0, again.err
    a = again.json()
    assert a["stages"] == {"transfer": "reused", "defend-eval": "reused"}
    assert all(a[key] == r[key] for key in FIGURES)
    text = cli("pipeline", "--model", "demo", "--defense", spec("smoothing"), *TINY, "--out", tmp_path / "run")
    assert text.code == 0 and "defence " + spec("smoothing") in " ".join(text.out.split())
    assert "IG-Defense (APGD" not in text.out  # the generic adaptive note, not IG-Defense's

    # igd report of the run folder and its RobustBench-style model info: the defence named, not IG-Defense
    rep = cli("report", tmp_path / "run", "--model-info", tmp_path / "info.json", "--json")
    assert rep.code == 0, rep.err
    page = (tmp_path / "run" / "report.md").read_text()
    assert "## Evaluation: base model vs the defence" in page and f"defence `{spec('smoothing')}`" in page
    assert "mask `" not in page
    info = json.loads((tmp_path / "info.json").read_text())
    d = info["igd"]["defense"]
    assert d["method"] == "own" and d["callable"] == "smoothing" and d["randomized"] is True
    assert d["source_sha256"] == r["defense"]["source_sha256"] and "the defence smoothing" in info["footnote"]
    assert info["external"] == f"{100 * r['worst_case']:.2f}"


def test_pieces_merge_to_the_whole_run(cli, tmp_path, igd_home):
    """transfer:I/N and defend:I/N pieces, then merge: the plain run reuses them and reads the whole run's figures."""
    common = ["pipeline", "--model", "demo", "--defense", spec("smoothing"), *TINY, "--json"]
    whole = cli(*common, "--out", tmp_path / "whole")
    assert whole.code == 0, whole.err
    for p in ("transfer:0/2", "transfer:1/2", "defend:0/2", "defend:1/2", "merge"):
        r = cli(*common, "--out", tmp_path / "cut", "--piece", p)
        assert r.code == 0, (p, r.err)
    cut = cli(*common, "--out", tmp_path / "cut")
    assert cut.code == 0, cut.err
    c, w = cut.json(), whole.json()
    assert c["stages"] == {"transfer": "reused", "defend-eval": "reused"}
    for key in FIGURES:
        assert c[key] == w[key], key


def test_an_edited_defence_is_evaluated_again(cli, tmp_path, igd_home):
    """The cache is keyed by the defence's source and fingerprint: a copy is reused, an edit is not."""
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(EXAMPLES / "bit_depth.py", folder / "bit_depth.py")
    common = ["pipeline", "--model", "demo", *TINY, "--out", tmp_path / "run", "--json"]
    first = cli(*common, "--defense", spec("bit_depth"))
    assert first.code == 0, first.err
    copy = cli(*common, "--defense", spec("bit_depth", folder))
    assert copy.code == 0 and copy.json()["stages"]["defend-eval"] == "reused", copy.err
    (folder / "bit_depth.py").write_text((folder / "bit_depth.py").read_text().replace("bits: int = 3",
                                                                                     "bits: int = 1"))
    edited = cli(*common, "--defense", spec("bit_depth", folder))
    assert edited.code == 0, edited.err
    e = edited.json()
    assert e["stages"] == {"transfer": "reused", "defend-eval": "computed"}  # the base model's sets stay valid
    assert e["defense"]["settings"] == {"bits": 1}
    assert e["defense"]["source_sha256"] != first.json()["defense"]["source_sha256"]


def test_ig_defense_options_and_pieces_are_refused(cli, tmp_path, igd_home):
    """What only IG-Defense has (ranking, calibration, its settings) is refused in one line, not ignored."""
    base = ["pipeline", "--model", "demo", "--defense", spec("bit_depth"), "--out", tmp_path / "run"]
    for extra, word in ((["--k", "3"], "--k"), (["--sigma", "0.1"], "--sigma"), (["--layer", "block3"], "--layer"),
                        (["--method", "random"], "--method"), (["--n-probe", "10"], "--n-probe")):
        r = cli(*base, *extra)
        assert r.code == 2 and r.err.startswith("error: ") and word in r.err and len(r.err.splitlines()) == 1
    for piece in ("rank", "rank:0:8", "calibrate"):
        r = cli(*base, "--piece", piece)
        assert r.code == 2 and "no ranking or calibration" in r.err, r.err
