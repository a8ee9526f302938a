"""Evaluation shards: ``igd attack --shard`` and ``igd defend-eval --shard`` + ``igd merge`` equal the unsharded
run (sets bit for bit, reports' accuracies, worst case and per-class accuracies), and merge refuses foreign,
overlapping or incomplete shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from igd_cli.artifacts import load_artifact, read_metadata
from igd_cli.cli import main

N = 30
TINY = ("--steps", "2", "--restarts", "1", "--queries", "10", "--eot-iter", "2")


def _run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A random importance and two deterministic masks (k = 24 and k = 40, no smoothing) on the demo model."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("eval_shards")
    mp.setenv("IGD_HOME", str(d / "home"))
    mp.setenv("IGD_NO_PROGRESS", "1")
    imp = d / "imp.safetensors"
    assert _run("rank", "--method", "random", "--n-probe", 20, "--device", "cpu", "--out", imp, "--json") == 0
    for k in (24, 40):
        assert _run("calibrate-k", "--importance", imp, "--k", k, "--no-rs", "--n-examples", N, "--device", "cpu",
                    "--out", d / f"mask{k}.safetensors", "--json") == 0
    yield d
    mp.undo()


def _shards(cli, out: Path, args: list, n_shards: int, stem: str, command: str = "defend-eval") -> list[Path]:
    paths = []
    for i in range(n_shards):
        p = out / f"{stem}.{i}-of-{n_shards}.safetensors"
        r = cli(command, *args, "--shard", f"{i}/{n_shards}", "--out" if command == "attack" else "--report", p,
                "--json")
        assert r.code == 0, r.err
        assert r.json()["n_examples"] == (i + 1) * N // n_shards - i * N // n_shards
        paths.append(p)
    return paths


def _merge(cli, paths, out: Path) -> dict:
    r = cli("merge", *paths, "--out", out, "--json")
    assert r.code == 0, r.err
    return r.json()


def _refused(cli, paths, out: Path, match: str) -> None:
    r = cli("merge", *paths, "--out", out, "--json")
    assert r.code == 2 and r.out == ""
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], r.err
    assert not out.exists()


def test_attack_shards_merge_to_the_unsharded_set(cli, work, tmp_path):
    common = ["--attack", "apgd-ce", "--steps", "3", "--n-examples", N, "--device", "cpu", "--batch-size", 7]
    whole = tmp_path / "whole.safetensors"
    r = cli("attack", *common, "--out", whole, "--json")
    assert r.code == 0, r.err
    parts = _shards(cli, tmp_path, common, 3, "ce", command="attack")
    j = _merge(cli, parts, tmp_path / "merged.safetensors")
    assert j["kind"] == "adversarial" and j["n_shards"] == 3 and j["n_examples"] == N
    a, b = load_artifact(whole, kind="adversarial"), load_artifact(tmp_path / "merged.safetensors", kind="adversarial")
    for t in ("x_adv", "y", "index"):
        assert torch.equal(a[t], b[t]), t
    assert torch.equal(b["index"], torch.arange(N))
    assert b.meta["robust_accuracy"] == a.meta["robust_accuracy"] == j["robust_accuracy"]
    assert b.meta["clean_accuracy"] == a.meta["clean_accuracy"]
    assert 0 < a.meta["robust_accuracy"] < a.meta["clean_accuracy"]  # the attack broke some images, not all
    assert [m["shard"] for m in b.meta["merged_from"]] == [[0, 3], [1, 3], [2, 3]]
    assert "shard" not in b.meta and b.meta["n_attacked"] == N
    for k in ("attack", "budget", "eps", "seed", "data", "model_fingerprint", "target"):
        assert b.meta[k] == a.meta[k], k

    # foreign (other seed), overlapping (0/3 twice; shards of 2 and 3 splits mixed) and missing shards
    other = tmp_path / "seed1.safetensors"
    assert cli("attack", *common, "--seed", 1, "--shard", "2/3", "--out", other).code == 0
    _refused(cli, [parts[0], parts[1], other], tmp_path / "bad.safetensors", "different seed")
    _refused(cli, [parts[0], parts[0], parts[1], parts[2]], tmp_path / "bad.safetensors", "overlap")
    half = tmp_path / "half.safetensors"
    assert cli("attack", *common, "--shard", "0/2", "--out", half).code == 0
    _refused(cli, [half, parts[1], parts[2]], tmp_path / "bad.safetensors", "overlap")
    _refused(cli, [parts[0], parts[2]], tmp_path / "bad.safetensors", "examples 10..19 are missing")


def test_clean_report_shards_merge_to_the_unsharded_report(cli, work, tmp_path):
    common = ["--mask", work / "mask24.safetensors", "--n-examples", N, "--device", "cpu", "--batch-size", 8]
    whole = tmp_path / "whole.safetensors"
    r = cli("defend-eval", *common, "--report", whole, "--json")
    assert r.code == 0, r.err
    wj = r.json()
    assert 0 < wj["clean_accuracy"] < 1
    parts = _shards(cli, tmp_path, common, 3, "clean")
    shard0 = load_artifact(parts[1], kind="eval-report")
    assert shard0.meta["shard"] == [1, 3] and shard0.meta["positions"] == [10, 20]
    assert torch.equal(shard0["index"], torch.arange(10, 20)) and shard0.meta["data"]["n"] == N
    j = _merge(cli, [parts[2], parts[0], parts[1]], tmp_path / "merged.safetensors")  # any order
    assert j["clean_accuracy"] == wj["clean_accuracy"] and j["base_clean_accuracy"] == wj["base_clean_accuracy"]
    a, b = load_artifact(whole, kind="eval-report"), load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    for t in ("correct", "y", "index", "base_draws", "defended_draws"):
        assert torch.equal(a[t], b[t]), t
    for k in ("n_examples", "columns", "candidates", "eval_identity", "data", "protocol", "draws"):
        assert b.meta[k] == a.meta[k], k
    for k in ("per_class", "clean_accuracy", "base_clean_accuracy", "scores"):
        assert b.meta["result"][k] == a.meta["result"][k], k
    assert b.meta["positions"] == [0, N] and "shard" not in b.meta
    h = cli("merge", *parts, "--out", tmp_path / "again.safetensors")
    assert h.code == 0 and f"{100 * wj['clean_accuracy']:.2f}" in h.out and "Clean" in h.out

    # foreign shards: other seed, other mask; overlap and gap
    seed1 = tmp_path / "seed1.safetensors"
    assert cli("defend-eval", *common, "--seed", 1, "--shard", "2/3", "--report", seed1).code == 0
    _refused(cli, [parts[0], parts[1], seed1], tmp_path / "bad.safetensors", "different seed")
    other = tmp_path / "mask40.safetensors"
    args40 = ["--mask", work / "mask40.safetensors", *common[2:]]
    assert cli("defend-eval", *args40, "--shard", "2/3", "--report", other).code == 0
    _refused(cli, [parts[0], parts[1], other], tmp_path / "bad.safetensors", "different")
    _refused(cli, [parts[0], parts[1], parts[1], parts[2]], tmp_path / "bad.safetensors", "overlap")
    _refused(cli, [parts[0], parts[1]], tmp_path / "bad.safetensors", "examples 20..29 are missing")
    _refused(cli, [parts[0], whole], tmp_path / "bad.safetensors", "overlap")


def test_adv_report_shards_merge_to_the_unsharded_report(cli, work, tmp_path):
    atk = ["--attack", "pgd", "--steps", "3", "--n-examples", N, "--device", "cpu"]
    adv = tmp_path / "pgd.safetensors"
    assert cli("attack", *atk, "--out", adv).code == 0
    adv_parts = _shards(cli, tmp_path, atk, 2, "pgd", command="attack")
    common = ["--mask", work / "mask40.safetensors", "--n-examples", N, "--device", "cpu", "--batch-size", 8]
    whole = tmp_path / "whole.safetensors"
    r = cli("defend-eval", *common, "--adv", adv, "--report", whole, "--json")
    assert r.code == 0, r.err
    wj = r.json()
    assert set(wj["robust_accuracy"]) == {"tr-pgd"} and wj["worst_case"] is not None
    # shard 0 is given the whole set (restricted to its positions), shard 1 its own shard of the set
    parts = []
    for i, given in enumerate([adv, adv_parts[1]]):
        p = tmp_path / f"rep{i}.safetensors"
        r = cli("defend-eval", *common, "--adv", given, "--shard", f"{i}/2", "--report", p, "--json")
        assert r.code == 0, r.err
        assert r.json()["shard"] == [i, 2]
        parts.append(p)
    j = _merge(cli, parts, tmp_path / "merged.safetensors")
    for k in ("clean_accuracy", "base_clean_accuracy", "robust_accuracy", "base_robust_accuracy", "worst_case",
              "n_examples"):
        assert j[k] == wj[k], k
    a, b = load_artifact(whole, kind="eval-report"), load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    for t in ("correct", "y", "index"):
        assert torch.equal(a[t], b[t]), t
    ra, rb = a.meta["result"], b.meta["result"]
    for k in ("per_class", "worst_case", "base_worst_case", "robust_accuracy", "measured_on_survivors", "mode"):
        assert rb[k] == ra[k], k
    assert b.meta["columns"] == a.meta["columns"] and b.meta["eval_identity"] == a.meta["eval_identity"]
    # a shard evaluated with a set of another attack does not belong
    fg = tmp_path / "fgsm.safetensors"
    assert cli("attack", "--attack", "fgsm", *atk[4:], "--out", fg).code == 0
    odd = tmp_path / "odd.safetensors"
    assert cli("defend-eval", *common, "--adv", fg, "--shard", "1/2", "--report", odd).code == 0
    _refused(cli, [parts[0], odd], tmp_path / "bad.safetensors", "different adv")
    # the attack report and the clean report of the same shard are different evaluations
    clean1 = tmp_path / "clean1.safetensors"
    assert cli("defend-eval", *common, "--shard", "1/2", "--report", clean1).code == 0
    _refused(cli, [parts[0], clean1], tmp_path / "bad.safetensors", "different adv")
    # an attack run here with other budgets is another evaluation
    steps = []
    for i, st in enumerate(("2", "3")):
        steps.append(tmp_path / f"steps{st}.safetensors")
        r = cli("defend-eval", *common, "--attack", "pgd", "--steps", st, "--workdir", tmp_path / "wd",
                "--shard", f"{i}/2", "--report", steps[-1], "--json")
        assert r.code == 0, r.err
        assert set(r.json()["robust_accuracy"]) == {"pgd"} and r.json()["budget"]["steps"] == int(st)
    _refused(cli, steps, tmp_path / "bad.safetensors", "different budget")


def test_randomized_defence_shards_merge_to_the_unsharded_report(cli, work, tmp_path):
    # smoothing on, with noise strong enough to change predictions, and batches that do not line up with the
    # shards: the noise is keyed by image content and APGD+EoT seeds per image, so the merge equals the whole run
    mask = tmp_path / "mask-rs.safetensors"
    r = cli("calibrate-k", "--importance", work / "imp.safetensors", "--k", 24, "--sigma", 0.35, "--tau", 0.3,
            "--n-examples", N, "--device", "cpu", "--out", mask, "--json")
    assert r.code == 0, r.err
    common = ["--mask", mask, "--attack", "apgd-eot", *TINY, "--n-examples", N, "--device", "cpu",
              "--batch-size", 7, "--workdir", tmp_path / "wd"]
    whole = tmp_path / "whole.safetensors"
    r = cli("defend-eval", *common, "--report", whole, "--json")
    assert r.code == 0, r.err
    wj = r.json()
    assert 0 < wj["robust_accuracy"]["apgd-eot"] < wj["clean_accuracy"]
    j = _merge(cli, _shards(cli, tmp_path, common, 3, "rs"), tmp_path / "merged.safetensors")
    assert wj["draws"] == 5 and wj["robust_accuracy_std"]["apgd-eot"] > 0  # the noise does flip predictions
    for k in ("clean_accuracy", "clean_accuracy_std", "robust_accuracy", "robust_accuracy_std",
              "base_robust_accuracy", "worst_case", "worst_case_std", "worst_case_majority", "worst_case_all_draws",
              "draws", "protocol"):
        assert j[k] == wj[k], k
    a, b = load_artifact(whole, kind="eval-report"), load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    for t in ("correct", "base_draws", "defended_draws"):
        assert torch.equal(a[t], b[t]), t
    assert a["defended_draws"].shape == (2, 10, N)  # clean and the attack, 5 final + 5 selection draws


def test_sharded_skipping_iwwc_equals_one_plain_run_on_a_randomized_defence(cli, work, tmp_path):
    """Issue 19: three shards with default skipping and batches that do not line up with them give, merged, the
    worst case of one unsharded run without skipping — AutoAttack (and its Square) included, on a defence whose
    noise flips predictions. Before per-image seeding, AutoAttack drew its starts per batch and this differed."""
    n = 9
    mask = tmp_path / "mask-rs.safetensors"
    r = cli("calibrate-k", "--importance", work / "imp.safetensors", "--k", 24, "--sigma", 0.35, "--tau", 0.3,
            "--n-examples", n, "--device", "cpu", "--out", mask, "--json")
    assert r.code == 0, r.err
    common = ["--mask", mask, "--attack", "iw-wc", *TINY, "--n-examples", n, "--device", "cpu"]
    plain = tmp_path / "plain.safetensors"
    r = cli("defend-eval", *common, "--no-skip", "--batch-size", 8, "--workdir", tmp_path / "wd-plain",
            "--report", plain, "--json")
    assert r.code == 0, r.err
    pj = r.json()
    assert pj["robust_accuracy_std"]["aa"] > 0 or pj["worst_case_std"] > 0  # the noise flips predictions
    parts = []
    for i in range(3):
        p = tmp_path / f"skip{i}.safetensors"
        r = cli("defend-eval", *common, "--batch-size", 2, "--workdir", tmp_path / "wd-shards", "--shard",
                f"{i}/3", "--report", p, "--json")
        assert r.code == 0, r.err
        parts.append(p)
    j = _merge(cli, parts, tmp_path / "merged.safetensors")
    for k in ("clean_accuracy", "worst_case", "worst_case_std", "worst_case_majority", "worst_case_all_draws",
              "base_worst_case"):
        assert j[k] == pj[k], k
    a, b = load_artifact(plain, kind="eval-report"), load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    row = a.meta["columns"].index("defended:worst_case")
    assert torch.equal(a["correct"][row], b["correct"][b.meta["columns"].index("defended:worst_case")])


def test_iwwc_shards_merge_to_the_unsharded_report(cli, work, tmp_path):
    # --no-skip: the merged report must equal the whole run bit for bit, every column included
    n = 8
    common = ["--mask", work / "mask40.safetensors", "--attack", "iw-wc", *TINY, "--n-examples", n,
              "--device", "cpu", "--batch-size", n // 2, "--no-skip"]
    whole = tmp_path / "whole.safetensors"
    r = cli("defend-eval", *common, "--workdir", tmp_path / "wd", "--report", whole, "--json")
    assert r.code == 0, r.err
    wj = r.json()
    assert wj["budget"]["steps"] == 2 and wj["measured_on_survivors"] == {} and len(wj["robust_accuracy"]) == 10  # 9 + adaptive
    assert 0 < wj["worst_case"] < wj["clean_accuracy"]  # some images broken, some not: the merge can go wrong
    parts = []
    for i in range(2):
        p = tmp_path / f"iw{i}.safetensors"
        r = cli("defend-eval", *common, "--workdir", tmp_path / "wds", "--shard", f"{i}/2", "--report", p, "--json")
        assert r.code == 0, r.err
        parts.append(p)
    assert sorted(q.name for q in (tmp_path / "wds").iterdir()) == ["shard-0-of-2", "shard-1-of-2"]
    sets = list((tmp_path / "wds" / "shard-1-of-2").glob("*.safetensors"))
    assert len(sets) == 10 and all(torch.equal(load_artifact(s)["index"], torch.arange(n // 2, n)) for s in sets)
    j = _merge(cli, parts, tmp_path / "merged.safetensors")
    for k in ("clean_accuracy", "robust_accuracy", "base_robust_accuracy", "worst_case", "base_worst_case"):
        assert j[k] == wj[k], k
    a, b = load_artifact(whole, kind="eval-report"), load_artifact(tmp_path / "merged.safetensors", kind="eval-report")
    assert torch.equal(a["correct"], b["correct"]) and b.meta["result"]["per_class"] == a.meta["result"]["per_class"]
    assert b.meta["budget"] == a.meta["budget"] and b.meta["skip"] is False


def test_bad_shards_and_budgets_give_one_error_line(cli, work, tmp_path):
    mask = work / "mask24.safetensors"
    for bad in ("3/3", "x", "0/0", "1", "-1/2", "31/31"):
        for cmd in (["defend-eval", "--mask", mask, "--report", tmp_path / "r.safetensors"],
                    ["attack", "--attack", "fgsm", "--out", tmp_path / "a.safetensors"]):
            r = cli(*cmd, "--n-examples", N, "--device", "cpu", "--shard", bad)
            assert r.code == 2 and r.err.startswith("error: --shard"), (bad, r.err)
    for args in (["--attack", "pgd", "--steps", "0"], ["--steps", "3"]):
        r = cli("defend-eval", "--mask", mask, "--n-examples", N, "--device", "cpu", *args)
        assert r.code == 2 and r.err.startswith("error:") and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "r.safetensors").exists() and not (tmp_path / "a.safetensors").exists()
    # an eval-report without the evaluation identity (as older igd wrote) is refused with a reason
    from igd_cli.artifacts import save_artifact

    old = tmp_path / "old.safetensors"
    save_artifact(old, "eval-report", {"correct": torch.ones(N, 2, dtype=torch.uint8),
                                       "index": torch.arange(N), "y": torch.zeros(N, dtype=torch.int64)},
                  {"data": {"dataset": "digits", "split": "test", "n": N}})
    _refused(cli, [old], tmp_path / "bad.safetensors", "eval_identity")
    assert json.loads(json.dumps(read_metadata(old)))["kind"] == "eval-report"
