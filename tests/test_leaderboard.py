"""RobustBench-style results (``igd report --model-info``): RobustBench's model-info fields filled from an eval report
exactly (figures computed here by hand from per-draw bits), AutoAttack's figure only where AutoAttack really ran
on every image with its full budget, the report of a run folder chosen without guessing, and one-line errors."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
import torch

from igd_cli.artifacts import save_artifact
from igd_cli.eval_result import EvalResult
from igd_cli.leaderboard import eps_text, eval_report_path, model_info

EPS = 8 / 255


def _report(path, mode, clean, columns, *, randomized, survivors=None, budget=None, settings=None):
    """An eval report from per-draw bits, with the metadata ``igd defend-eval --report`` writes."""
    n = clean.shape[1]
    res = EvalResult(torch.zeros(n, dtype=torch.long), torch.arange(n), [str(c) for c in range(10)],
                     clean.clone(), clean.clone(), base={k: v.clone() for k, v in columns.items()},
                     defended=dict(columns), survivors_only=dict(survivors or {}), eps=EPS, mode=mode,
                     randomized=randomized)
    budget = budget or {"steps": None, "restarts": None, "queries": None, "eot_iter": None}
    settings = settings or {"tau": 0.01, "sigma": 4 / 255, "n_smooth": 1, "rs": randomized}
    meta = {"model": "demo", "model_fingerprint": "0123456789abcdef", "num_classes": 10, "dataset": "digits",
            "mask": "mask.safetensors", "mask_sha256": "ab" * 32, "layer": "block3", "k": 16,
            "settings": settings, "attack": mode, "eps": EPS, "norm": "Linf", "budget": budget, "seed": 0,
            "data": {"dataset": "digits", "split": "test", "n": n},
            "eval_identity": {"data": {"images": "cd" * 32, "n": n}, "norm": "Linf", "budget": budget}}
    res.save(path, meta)
    return path


def test_autoattack_on_every_image_with_its_budget_fills_autoattack_acc(tmp_path):
    # deterministic (one draw): per image the worse of clean and AutoAttack is the AND
    clean = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    aa = torch.tensor([[1, 0, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    path = _report(tmp_path / "eval-aa.safetensors", "aa", clean, {"aa": aa}, randomized=False,
                   settings={"tau": 0.01, "sigma": None, "n_smooth": 1, "rs": False})
    info = model_info(path)
    assert info["clean_acc"] == "87.50"  # 7 of 8
    assert info["autoattack_acc"] == "50.00"  # images 0, 2, 4, 5
    assert info["external"] is None  # one attack is not a stronger evaluation than AutoAttack
    assert (info["eps"], info["threat_model"], info["dataset"]) == ("8/255", "Linf", "digits")
    assert info["number_forward_passes"] == 2  # no smoothing: the first pass and the masked pass
    assert all(info[k] is None for k in ("link", "name", "authors", "venue", "additional_data", "architecture",
                                         "reported", "unreliable"))
    igd = info["igd"]
    assert igd["autoattack_accuracy"] == {"mean": 0.5, "std": 0.0}
    assert igd["robust_accuracy"]["mean"] == 0.5 and igd["robust_accuracy"]["what"].endswith("AA")
    assert igd["defense"]["k"] == 16 and igd["defense"]["method"] == "IG-Defense"
    assert igd["data"] == {"dataset": "digits", "split": "test", "n_examples": 8, "images_sha256": "cd" * 32}
    assert igd["scoring"]["randomized"] is False and "once" in igd["scoring"]["how"]
    assert "AutoAttack (standard version) on the defended model, every image" in info["footnote"]
    json.dumps(info, allow_nan=False)  # plain JSON


def test_iwwc_of_a_randomized_defence_is_external_with_its_repeated_draw_std(tmp_path):
    # R = 2 draws: rows 0, 1 final, rows 2, 3 selection. Image 0: AA's point is wrong in both selection draws and
    # is selected (finals 1, 0); image 1: a tie (2 and 2 correct) keeps the earlier candidate, clean (finals 1, 1).
    clean = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1]], dtype=torch.bool)
    tr_aa = torch.ones(4, 2, dtype=torch.bool)
    aa = torch.tensor([[1, 1], [0, 1], [0, 1], [0, 1]], dtype=torch.bool)
    path = _report(tmp_path / "eval-iw-wc.safetensors", "iw-wc", clean, {"tr-aa": tr_aa, "aa": aa},
                   randomized=True, survivors={"aa": 1}, budget={"steps": 20, "restarts": 1, "queries": None,
                                                                 "eot_iter": None},
                   settings={"tau": 0.01, "sigma": 4 / 255, "n_smooth": 3, "rs": True})
    info = model_info(path)
    per_draw = [1.0, 0.5]  # draw 0: both images right; draw 1: image 0 wrong
    assert info["external"] == "75.00"
    assert info["igd"]["robust_accuracy"]["mean"] == statistics.mean(per_draw)
    assert info["igd"]["robust_accuracy"]["std"] == pytest.approx(statistics.stdev(per_draw), abs=1e-15)
    assert info["clean_acc"] == "100.00"
    # AutoAttack ran only on the survivors: no autoattack_acc, and the reason is said
    assert info["autoattack_acc"] is None and info["igd"]["autoattack_accuracy"] is None
    assert "only on the 1 images" in info["igd"]["autoattack_note"]
    assert info["number_forward_passes"] == 4  # n_s = 3 noisy copies, then the masked pass
    assert info["igd"]["evaluation"]["columns"] == ["tr-aa", "aa"]  # scoring order, not sorted
    assert "Tr-AA, AA" in info["igd"]["robust_accuracy"]["what"]
    assert "reduced (steps 20, restarts 1)" in info["footnote"]
    assert "2 noise draws" in info["footnote"] and "± std" in info["footnote"]


def test_reduced_budgets_keep_autoattack_out_of_autoattack_acc(tmp_path):
    clean = torch.ones(1, 4, dtype=torch.bool)
    path = _report(tmp_path / "r.safetensors", "aa", clean, {"aa": clean.clone()}, randomized=False,
                   budget={"steps": 2, "restarts": None, "queries": None, "eot_iter": None})
    info = model_info(path)
    assert info["autoattack_acc"] is None and "reduced budgets (steps 2)" in info["igd"]["autoattack_note"]


#: RobustBench's model-info fields for an Lp threat model: its ``ModelInfo`` dataclass (robustbench/utils.py)
#: without the corruption leaderboards' fields, plus ``external`` and ``unreliable``, which its
#: ``model_info/<dataset>/<Linf|L2>/*.json`` files carry (its leaderboard ranks by ``external`` when present)
ROBUSTBENCH_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote", "external",
                      "unreliable"}


def test_the_file_has_robustbenchs_fields_and_igds_record_under_igd(tmp_path):
    clean = torch.ones(1, 4, dtype=torch.bool)
    info = model_info(_report(tmp_path / "e.safetensors", "fgsm", clean, {"fgsm": clean.clone()}, randomized=False))
    assert set(info) - {"threat_model", "igd"} == ROBUSTBENCH_FIELDS
    # RobustBench's accuracies are percent strings that float() reads; eps a string
    assert float(info["clean_acc"]) == 100.0 and isinstance(info["eps"], str)


@pytest.mark.parametrize("eps,norm,text", [(8 / 255, "Linf", "8/255"), (4 / 255, "Linf", "4/255"),
                                           (0.5, "L2", "0.5"), (0.3, "Linf", "0.3"), (0.2, "Linf", "0.2"),
                                           (0.031, "Linf", "0.031"), (8 / 255, "L2", repr(8 / 255))])
def test_eps_as_robustbench_writes_it(eps, norm, text):
    assert eps_text(eps, norm) == text


def test_a_run_folder_gives_its_one_report_or_its_iwwc_one(tmp_path, cli):
    clean = torch.ones(1, 4, dtype=torch.bool)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(Exception, match="no eval report"):
        eval_report_path(run)
    save_artifact(run / "mask.safetensors", "mask", {"mask": torch.ones(4, 10, dtype=torch.uint8)}, {})
    one = _report(run / "eval-fgsm.safetensors", "fgsm", clean, {"fgsm": clean.clone()}, randomized=False)
    assert eval_report_path(run) == one
    _report(run / "eval-pgd.safetensors", "pgd", clean, {"pgd": clean.clone()}, randomized=False)
    r = cli("report", run, "--model-info", tmp_path / "mi.json")
    assert r.code == 2 and r.err.count("\n") == 1 and "several eval reports" in r.err
    assert not (tmp_path / "mi.json").exists() and not (run / "report.md").exists()
    iwwc = _report(run / "eval-iw-wc.safetensors", "iw-wc", clean, {"aa": clean.clone()}, randomized=False)
    r = cli("report", run, "--model-info", tmp_path / "mi.json", "--json")
    assert r.code == 0, r.err
    assert r.json()["eval_report"] == iwwc.name and (run / "report.md").exists()
    assert json.loads((tmp_path / "mi.json").read_text()) == model_info(iwwc)


def test_an_eval_report_from_defend_eval(tmp_path, cli, igd_home):
    """Through the commands: defend-eval --report, then igd report FILE --model-info."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(128, 10, dtype=torch.uint8)
    for c in range(10):
        mask[torch.randperm(128, generator=g)[:40], c] = 1
    from igd_cli.models import load_model

    demo = load_model("demo")
    meta = {"model": "demo", "model_fingerprint": demo.fingerprint, "num_classes": 10, "dataset": "digits",
            "layer": "block3", "k": 40, "defense": {"tau": 0.01, "sigma": 0.1, "n_smooth": 3, "rs": True}}
    save_artifact(tmp_path / "mask.safetensors", "mask", {"mask": mask}, meta)
    ev = cli("defend-eval", "--mask", tmp_path / "mask.safetensors", "--attack", "fgsm", "--n-examples", "8",
             "--draws", "2", "--report", tmp_path / "eval.safetensors", "--workdir", tmp_path / "adv", "--json")
    assert ev.code == 0, ev.err
    e = ev.json()
    r = cli("report", tmp_path / "eval.safetensors", "--model-info", tmp_path / "mi.json", "--json")
    assert r.code == 0, r.err
    assert r.json()["out"] is None  # no Markdown page for one report
    info = json.loads((tmp_path / "mi.json").read_text())
    assert info["clean_acc"] == f"{100 * e['clean_accuracy']:.2f}"
    assert info["igd"]["robust_accuracy"]["mean"] == e["worst_case"]
    assert info["igd"]["robust_accuracy"]["std"] == e["worst_case_std"]
    assert info["igd"]["robust_accuracy"]["what"] == "per image the worse of clean and FGSM"
    assert info["external"] is None and info["autoattack_acc"] is None
    assert info["eps"] == "0.2" and info["number_forward_passes"] == 4
    assert info["igd"]["data"]["n_examples"] == 8 and info["igd"]["data"]["split"] == "test"
    assert info["igd"]["scoring"]["draws"] == 2 and info["igd"]["scoring"]["randomized"] is True
    assert "on demo, 8 test images of digits, Linf ε = 0.2" in info["footnote"]


@pytest.mark.parametrize("args,needle", [
    (["{file}"], "pass --model-info"),
    (["{file}", "--model-info", "{tmp}/mi.json", "--out", "{tmp}/r.md"], "--out: the Markdown page"),
    (["{tmp}/absent", "--model-info", "{tmp}/mi.json"], "no such run folder"),
    (["{file}", "--model-info", "{tmp}"], "is a directory"),
])
def test_bad_input_is_one_error_line(tmp_path, cli, args, needle):
    clean = torch.ones(1, 4, dtype=torch.bool)
    f = _report(tmp_path / "eval.safetensors", "fgsm", clean, {"fgsm": clean.clone()}, randomized=False)
    r = cli("report", *[a.format(file=f, tmp=tmp_path) for a in args])
    assert r.code == 2 and r.err.startswith("error: ") and r.err.count("\n") == 1 and needle in r.err, r.err


def test_a_damaged_report_is_refused(tmp_path, cli):
    clean = torch.ones(1, 4, dtype=torch.bool)
    f = _report(tmp_path / "eval.safetensors", "fgsm", clean, {"fgsm": clean.clone()}, randomized=False)
    data = bytearray(f.read_bytes())
    data[-1] ^= 1  # a tensor byte: the digest no longer matches
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    r = cli("report", bad, "--model-info", tmp_path / "mi.json")
    assert r.code == 2 and r.err.count("\n") == 1 and not (tmp_path / "mi.json").exists()
    shutil.copy(f, tmp_path / "good.safetensors")
    assert cli("report", tmp_path / "good.safetensors", "--model-info", tmp_path / "mi.json").code == 0
