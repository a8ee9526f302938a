"""``igd rank`` and ``igd merge``: artifacts, shards + merge == one run, resume, refusals and one-line errors."""

from __future__ import annotations

import pytest
import torch

from .conftest import cifar_safetensors, digits_safetensors
from igd_cli.artifacts import file_sha256, load_artifact, read_metadata, save_artifact
from igd_cli.errors import IgdError
from igd_cli.shards import check_cover, parse_neurons, shard_path, shard_ranges

DEMO = ["--model", "demo", "--n-probe", "30", "--batch-size", "16", "--json"]


def rank(cli, *args):
    r = cli("rank", *DEMO, *args)
    assert r.code == 0, r.err
    return r.json()


def test_rank_lo_ir_artifact_and_json(cli, tmp_path):
    out = tmp_path / "imp.safetensors"
    j = rank(cli, "--out", out)
    assert {"out", "method", "layer", "shape", "n_probe", "seconds"} <= set(j)
    assert j["method"] == "lo-ir" and j["layer"] == "block3" and j["shape"] == [128, 10] and j["n_probe"] == 30
    assert j["path"] == "closed-form" and j["kind"] == "importance" and j["skipped"] is False
    art = load_artifact(out, kind="importance")
    assert art["importance"].dtype == torch.float32 and art["importance"].shape == (128, 10)
    m = art.meta
    assert m["model"] == "demo" and len(m["model_fingerprint"]) == 16 and m["num_classes"] == 10
    assert m["layer"] == "block3" and m["method"] == "lo-ir" and m["n_neurons"] == 128
    assert m["data"] == {"dataset": "digits", "split": "train", "n": 30} and isinstance(m["params"], dict)
    assert m["seconds"] >= 0 and m["details"]["path"] == "closed-form"


def test_exact_naive_flag_gives_the_same_rows(cli, tmp_path):
    j = rank(cli, "--neurons", "0:6", "--exact-naive", "--out", tmp_path / "n.safetensors")
    assert j["path"] == "naive" and j["shape"] == [6, 10]
    rank(cli, "--out", tmp_path / "f.safetensors")
    naive = load_artifact(tmp_path / "n.safetensors")["importance"]
    fast = load_artifact(tmp_path / "f.safetensors")["importance"][:6]
    assert torch.allclose(naive, fast, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,extra", [("lo-ir", ["--layer", "block2"]), ("random", ["--seed", "3"])])
def test_shards_then_merge_equal_one_run(cli, tmp_path, method, extra):
    args = ["--method", method, *extra]
    full = tmp_path / "full.safetensors"
    j = rank(cli, *args, "--out", full)
    n = j["shape"][0]
    cuts = [(0, 10), (10, 37), (37, n)]
    shards = []
    for a, b in cuts:
        p = shard_path(tmp_path / "imp.safetensors", a, b)
        js = rank(cli, *args, "--neurons", f"{a}:{b}", "--out", p)
        assert js["kind"] == "importance-shard" and js["shape"] == [b - a, 10] and js["neurons"] == [a, b]
        assert read_metadata(p)["neurons"] == [a, b]
        shards.append(p)
    merged = tmp_path / "merged.safetensors"
    r = cli("merge", shards[2], shards[0], shards[1], "--out", merged, "--json")  # any order
    assert r.code == 0, r.err
    assert r.json()["shape"] == [n, 10] and r.json()["n_shards"] == 3 and r.json()["kind"] == "importance"
    got, want = load_artifact(merged, kind="importance"), load_artifact(full, kind="importance")
    assert torch.allclose(got["importance"], want["importance"], rtol=1e-5, atol=1e-6)
    for key in ("model_fingerprint", "layer", "method", "n_neurons", "data", "params", "num_classes"):
        assert got.meta[key] == want.meta[key]
    assert [s["neurons"] for s in got.meta["merged_from"]] == [list(c) for c in cuts]
    # --neurons 0:N is still a shard (a job array with one job), and merges alone
    one = tmp_path / "one.safetensors"
    assert rank(cli, *args, "--neurons", f"0:{n}", "--out", one)["kind"] == "importance-shard"
    assert cli("merge", one, "--out", tmp_path / "one-merged.safetensors").code == 0
    alone = load_artifact(tmp_path / "one-merged.safetensors", kind="importance")
    assert torch.equal(alone["importance"], load_artifact(one)["importance"]) and alone.meta["n_neurons"] == n


def test_resume_skips_a_finished_shard_and_force_recomputes(cli, tmp_path):
    out = tmp_path / "s.safetensors"
    rank(cli, "--neurons", "0:20", "--out", out)
    digest = file_sha256(out)
    again = rank(cli, "--neurons", "0:20", "--out", out)
    assert again["skipped"] is True and file_sha256(out) == digest
    human = cli("rank", *DEMO[:-1], "--neurons", "0:20", "--out", out)
    assert human.code == 0 and "skipped" in human.out
    forced = rank(cli, "--neurons", "0:20", "--force", "--out", out)
    assert forced["skipped"] is False
    other = rank(cli, "--neurons", "0:21", "--out", out)  # another range: the file is recomputed
    assert other["skipped"] is False and load_artifact(out)["importance"].shape == (21, 10)


def test_merge_refuses_overlap_gap_foreign_and_mixed(cli, tmp_path):
    a = tmp_path / "a.safetensors"
    b = tmp_path / "b.safetensors"
    c = tmp_path / "c.safetensors"
    rank(cli, "--neurons", "0:64", "--out", a)
    rank(cli, "--neurons", "60:128", "--out", b)
    rank(cli, "--neurons", "64:100", "--out", c)
    out = tmp_path / "m.safetensors"

    def refused(*files):
        r = cli("merge", *files, "--out", out)
        assert r.code == 2 and r.err.startswith("error: ") and r.err.count("\n") == 1, r.err
        assert not out.exists()
        return r.err

    assert "overlap" in refused(a, b)
    assert "missing" in refused(a, c)
    assert "missing" in refused(c)
    assert "overlap" in refused(a, a)
    # foreign: another probe set, another method, another model
    d = tmp_path / "d.safetensors"
    r = cli("rank", "--model", "demo", "--n-probe", "31", "--neurons", "64:128", "--out", d, "--json")
    assert r.code == 0
    assert "does not belong" in refused(a, d) and "data" in refused(a, d)
    e = tmp_path / "e.safetensors"
    rank(cli, "--method", "random", "--neurons", "64:128", "--out", e)
    assert "method" in refused(a, e)
    f = tmp_path / "f.safetensors"
    art = load_artifact(c)
    save_artifact(f, "importance-shard", {"importance": torch.zeros(64, 10)},
                  {**art.meta, "model_fingerprint": "0123456789abcdef", "neurons": [64, 128]})
    assert "model_fingerprint" in refused(a, f)
    full = tmp_path / "full.safetensors"
    rank(cli, "--out", full)
    assert "different kinds" in refused(a, full)
    assert "takes shards" in refused(full)
    assert "is one of the shards" in cli("merge", a, "--out", a).err


def test_rank_errors_are_one_line(cli, tmp_path):
    out = tmp_path / "x.safetensors"
    cases = [
        (["--layer", "nope"], "no such layer"),
        (["--neurons", "a:b"], "expected A:B"),
        (["--neurons", "9:9"], "smaller than B"),
        (["--neurons", "0:999"], "exceeds"),
        (["--method", "magic"], "unknown"),
        (["--split", "val"], "expected train or test"),
    ]
    for args, text in cases:
        r = cli("rank", "--model", "demo", "--n-probe", "8", *args, "--out", out)
        assert r.code == 2 and r.err.startswith("error: ") and r.err.count("\n") == 1, (args, r.err)
        assert text in r.err, (args, r.err)
    data = cifar_safetensors(tmp_path, n=4, classes=3)
    r = cli("rank", "--model", "demo", "--dataset", data, "--out", out)
    assert r.code == 2 and "3 classes" in r.err
    assert not out.exists()


def test_random_is_seeded(cli, tmp_path):
    rank(cli, "--method", "random", "--seed", "1", "--out", tmp_path / "a.safetensors")
    rank(cli, "--method", "random", "--seed", "1", "--out", tmp_path / "b.safetensors")
    rank(cli, "--method", "random", "--seed", "2", "--out", tmp_path / "c.safetensors")
    a, b, c = (load_artifact(tmp_path / f"{k}.safetensors")["importance"] for k in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 1 and a.std() > 0.2


def test_shard_helpers():
    assert parse_neurons(None, 10) == (0, 10)
    assert parse_neurons("3:", 10) == (3, 10) and parse_neurons(":4", 10) == (0, 4)
    with pytest.raises(IgdError):
        parse_neurons("-1:4", 10)
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_path("out/imp.safetensors", 0, 128).name == "imp.00000-00128.safetensors"
    with pytest.raises(IgdError, match="bad or missing"):
        from igd_cli.artifacts import Artifact

        check_cover([Artifact(shard_path("x.safetensors", 0, 1), {}, {"neurons": [0, 20]})], 10)


def test_rank_probe_dataset(cli, tmp_path):
    """--probe-dataset FILE ranks on the file's images (no splits: all of them, first N), whatever --dataset says."""
    train = digits_safetensors(tmp_path, "train", 60)
    j = rank(cli, "--probe-dataset", train, "--dataset", "digits", "--out", tmp_path / "f.safetensors")
    ref = rank(cli, "--dataset", "digits", "--split", "train", "--out", tmp_path / "d.safetensors")
    assert j["n_probe"] == 30 and ref["n_probe"] == 30
    a, b = load_artifact(tmp_path / "f.safetensors"), load_artifact(tmp_path / "d.safetensors")
    assert a.meta["data"] == {"dataset": str(train), "split": "train", "n": 30}
    # same pixels; float32 rounding may differ (sklearn's digits tensor has channel stride 1, which oneDNN
    # reads as channels-last, and picks another convolution kernel)
    assert torch.allclose(a["importance"], b["importance"], rtol=0, atol=1e-6)
