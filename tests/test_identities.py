"""Identities without holes: a data file rewritten with its old size and mtime, igd's own code, the numerics, an
attack's parts and the evaluation's budgets are each in the identity that decides reuse and merging, and a piece,
shard or artifact made otherwise is refused in one line naming both values."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import igd_cli.evaluate as evaluate
from igd_cli import numerics, provenance
from igd_cli.artifacts import cached_file_sha256, file_sha256, load_artifact, read_metadata

from .conftest import digits_safetensors

#: a pipeline run small enough to repeat: random ranking, AutoAttack at 2 steps on 8 images, 2 draws
OPTS = ["--method", "random", "--n-probe", "40", "--n-examples", "8", "--attack", "aa", "--steps", "2",
        "--queries", "10", "--batch-size", "8", "--draws", "2", "--json"]
COMPUTED = {"rank": "computed", "calibrate": "computed", "transfer": "computed", "defend-eval": "computed"}


def _rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` in place (same inode, as ``cp -p`` onto it leaves it) and put its old mtime back
    (``cp -p``, ``rsync -t`` and ``tar x`` all do): only the ctime, which the kernel sets, tells it changed."""
    before = path.stat()
    assert len(data) == before.st_size and data != path.read_bytes()
    while True:
        path.write_bytes(data)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        if after.st_ctime_ns != before.st_ctime_ns:  # a coarse clock can leave it equal within one tick
            break
        time.sleep(0.01)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def _reversed_images(path: Path) -> bytes:
    """The tensor file's bytes with its images in reverse order: another data set of the very same size."""
    t = load_file(str(path))
    out = path.with_suffix(".tmp")
    save_file({"x": t["x"].flip(0).contiguous(), "y": t["y"].flip(0).contiguous()}, str(out),
              metadata=_raw_metadata(path))
    data = out.read_bytes()
    out.unlink()
    return data


def _raw_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def _error(r) -> str:
    """The one error line (after any progress lines on stderr)."""
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2 and len(errors) == 1 and r.err.strip().splitlines()[-1] == errors[0], r.err
    return errors[0]


def _fake_cuda(monkeypatch) -> dict:
    """From here on igd believes it computes on a GPU with TF32 on (the refusal paths, without a GPU)."""
    real = numerics.record

    def fake(device):
        return {**real(device), "mode": "fast", "device": "a GPU", "device_type": "cuda", "tf32": True,
                "deterministic": False}

    monkeypatch.setattr(numerics, "record", fake)
    return fake("cpu")


# --- a rewritten data file with its old size and mtime ---------------------------------------------

def test_the_digest_cache_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path, igd_home, monkeypatch):
    import igd_cli.artifacts as artifacts

    path = digits_safetensors(tmp_path, "test", 50)
    first = cached_file_sha256(path)
    _rewrite_keeping_size_and_mtime(path, _reversed_images(path))
    assert cached_file_sha256(path) == file_sha256(path) != first  # this process's memo
    monkeypatch.setattr(artifacts, "_SHA_MEMO", {})
    assert cached_file_sha256(path) == file_sha256(path)  # the store under $IGD_HOME/cache


def test_pipeline_on_a_file_rewritten_with_its_old_size_and_mtime_recomputes(tmp_path, cli, igd_home):
    """The evaluation file rewritten as `cp -p` leaves it: the calibration and the evaluation are redone on its new
    images (the digest cache by path, size and mtime reused every stage)."""
    test = digits_safetensors(tmp_path, "test", 60)
    train = digits_safetensors(tmp_path, "train", 40)
    args = ["--dataset", test, "--probe-dataset", train, *OPTS, "--out", tmp_path / "run"]
    first = cli("pipeline", *args)
    assert first.code == 0, first.err
    old = file_sha256(test)
    _rewrite_keeping_size_and_mtime(test, _reversed_images(test))
    again = cli("pipeline", *args)
    assert again.code == 0, again.err
    got = again.json()
    assert got["stages"] == {**COMPUTED, "rank": "reused"}  # the ranking's images did not change
    for path in (got["paths"]["report"], got["paths"]["mask"]):
        made_on = read_metadata(path)["pipeline_identity"]["data"]["images"]
        assert made_on == file_sha256(test) != old


# --- igd's own code in every identity ---------------------------------------------------------------

def test_the_code_digest_covers_figure_making_modules_only(tmp_path):
    copy = tmp_path / "igd_cli"
    shutil.copytree(provenance.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    here = provenance.code_digest()
    assert provenance.code_digest(copy) == here  # the bytes, not where the package is installed
    for entry in provenance.PRESENTATION:  # the list names what exists
        assert (copy / entry).exists(), entry
    listed = {p.relative_to(copy).as_posix() for p in provenance.figure_modules(copy)}
    assert {"noise.py", "defense.py", "attacks/apgd.py", "scoring.py", "evaluate.py"} <= listed
    assert not listed & {"cli.py", "commands/rank.py", "report.py", "run_report.py", "console.py"}
    for presentation in ("commands/rank.py", "report.py", "run_report.py", "audit/plots.py"):
        f = copy / presentation
        f.write_text(f.read_text().replace('"""', '"""Reworded. ', 1))
        provenance._digest.cache_clear()
        assert provenance.code_digest(copy) == here, presentation
    noise = copy / "noise.py"
    noise.write_text(noise.read_text() + "\nSOME_CONSTANT = 2\n")
    provenance._digest.cache_clear()
    assert provenance.code_digest(copy) != here


def test_a_run_folder_made_with_other_numerics_or_igd_code_is_not_reused(tmp_path, cli, igd_home, monkeypatch):
    """A folder made with other numerics, or by another igd (an editable install whose noise.py changed, same
    version: it was reused whole), is recomputed stage by stage, each with one note naming both values."""
    first = cli("pipeline", *OPTS, "--out", tmp_path / "run")
    assert first.code == 0, first.err
    assert first.json()["numerics"]["mode"] == "pinned"
    with monkeypatch.context() as m:
        fake = _fake_cuda(m)
        again = cli("pipeline", *OPTS, "--out", tmp_path / "run")
        assert again.code == 0, again.err
        assert again.json()["stages"] == COMPUTED and again.json()["numerics"]["tf32"] is True
        notes = [ln for ln in again.err.splitlines() if ln.startswith("note:")]
        want = (f"made with numerics cpu with deterministic algorithms, not this run's "
                f"{numerics.describe(numerics.identity_of(fake))}: recomputing it")
        assert len(notes) >= 3 and all(want in ln for ln in notes), notes
        assert read_metadata(again.json()["paths"]["mask"])["numerics"]["device"] == "a GPU"

    code = first.json()["igd_code"]
    other = code.split("+")[0] + "+" + "0" * 16
    monkeypatch.setattr(provenance, "code_digest", lambda root=None: other)
    again = cli("pipeline", *OPTS, "--out", tmp_path / "run")
    assert again.code == 0, again.err
    assert again.json()["stages"] == COMPUTED and again.json()["igd_code"] == other
    notes = [ln for ln in again.err.splitlines() if ln.startswith("note:")]
    assert len(notes) >= 3 and all(f"made with igd code {code}, not this run's {other}" in ln for ln in notes), notes


def test_the_analyses_caches_are_not_reused_by_other_igd_code(tmp_path, cli, igd_home, monkeypatch):
    """A sweep point and the shift analysis's δ* set are recomputed by another igd (they were reused)."""
    import igd_cli.analysis.shift as shift

    imp = tmp_path / "imp.safetensors"
    assert cli("rank", "--method", "random", "--n-probe", 20, "--out", imp).code == 0
    sweep = ["analyze", "sweep", "--importance", imp, "--over", "k", "--values", "8", "--attack", "none",
             "--n-examples", 10, "--out", tmp_path / "run", "--json"]
    shift_args = ["analyze", "shift", "--importance", imp, "--k", 8, "--steps", 2, "--n-examples", 10,
                  "--out", tmp_path / "run", "--json"]
    attacked: list[str] = []
    real = shift.run_attack

    def spy(atk, *a, **k):
        attacked.append(atk.name)
        return real(atk, *a, **k)

    monkeypatch.setattr(shift, "run_attack", spy)
    for again in (False, True):
        r = cli(*sweep)
        assert r.code == 0, r.err
        assert (r.json()["computed"], r.json()["reused"]) == ((0, 1) if again else (1, 0))
        assert cli(*shift_args).code == 0
    assert len(attacked) == 1
    monkeypatch.setattr(provenance, "code_digest", lambda root=None: "0.0.1+" + "e" * 16)
    assert cli(*sweep).json()["computed"] == 1
    assert cli(*shift_args).code == 0 and len(attacked) == 2


def test_the_clip_cache_is_not_reused_by_other_igd_code(demo, tmp_path, monkeypatch):
    import igd_cli.ranking.cd_ir as cd
    from igd_cli.artifacts import save_artifact
    from igd_cli.data import load_dataset
    from igd_cli.errors import IgdError

    data = load_dataset("digits", "train", 10)
    g = torch.Generator().manual_seed(0)
    emb = {name: torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
           for name in ("image_embeddings", "text_embeddings")}
    path = tmp_path / "cache.safetensors"
    save_artifact(path, "clip-cache", emb, cd.cache_meta("fake", "none", data, "{}"))
    kw = dict(clip_model="fake", clip_pretrained="none", cache=path, show_progress=False)
    assert cd.cd_ir(demo.model, "block3", data, **kw).cache_reused
    monkeypatch.setattr(provenance, "code_digest", lambda root=None: "0.0.1+" + "d" * 16)
    monkeypatch.setattr(cd, "load_clip", lambda *a, **k: (_ for _ in ()).throw(IgdError("CLIP ran")))
    with pytest.raises(IgdError, match="CLIP ran"):  # the cache of another igd is not reused
        cd.cd_ir(demo.model, "block3", data, **kw)


def test_the_adaptive_attacks_sets_change_with_its_stage_one(tmp_path, demo, monkeypatch):
    """The adaptive attack runs apgd-eot as its stage 1: a new apgd-eot revision is a new adaptive attack, whose
    cached set is not reused (its set key missed stage 1's revision)."""
    from igd_cli.attacks import ATTACKS
    from igd_cli.attacks.apgd import APGDEoT
    from igd_cli.common import Target
    from igd_cli.data import load_dataset

    target = Target(demo, torch.device("cpu"), "digits")
    data = load_dataset("digits", "test", 4)
    ran: list[str] = []
    real = evaluate.run_attack

    def spy(atk, *a, **k):
        ran.append(atk.name)
        return real(atk, *a, **k)

    monkeypatch.setattr(evaluate, "run_attack", spy)

    def obtain():
        ev = evaluate.Evaluator(target, None, data, eps=0.1, workdir=tmp_path, show_progress=False,
                                budgets=evaluate.Budgets(steps=1, eot_iter=1))
        return ev.obtain("adaptive", "base", torch.arange(4))[0]

    first = obtain()
    obtain()
    assert ran == ["adaptive"]  # reused
    monkeypatch.setattr(APGDEoT, "revision", APGDEoT.revision + 1)
    obtain()
    assert ran == ["adaptive", "adaptive"]
    assert first.info["revision"]["apgd-eot"] == APGDEoT.revision - 1
    own = ATTACKS["adaptive"].revisions()  # its own, its base classes' and its parts' (stage 1; PGD, stage 3)
    assert own["apgd-eot"] == APGDEoT.revision and own["pgd"] == ATTACKS["pgd"].revision
    assert own["adaptive"] == ATTACKS["adaptive"].revision


# --- merges of evaluations compare the pieces' identities --------------------------------------------

def test_shards_made_with_other_numerics_or_code_are_not_merged(tmp_path, cli, igd_home, monkeypatch):
    imp = tmp_path / "imp.safetensors"
    assert cli("rank", "--method", "random", "--n-probe", 20, "--out", imp).code == 0
    mask = tmp_path / "mask.safetensors"
    assert cli("calibrate-k", "--importance", imp, "--k", 8, "--no-rs", "--n-examples", 8, "--out", mask).code == 0
    jobs = {"report": ["defend-eval", "--mask", mask, "--n-examples", 8, "--report"],
            "set": ["attack", "--attack", "fgsm", "--n-examples", 8, "--out"],
            "importance": ["rank", "--method", "random", "--n-probe", 20, "--out"]}
    cut = {"report": ("--shard", "{i}/2"), "set": ("--shard", "{i}/2"), "importance": ("--neurons", "{a}:{b}")}

    def piece(name: str, i: int) -> Path:
        path = tmp_path / f"{name}-{i}.safetensors"
        opt, value = cut[name]
        r = cli(*jobs[name], path, opt, value.format(i=i, a=64 * i, b=64 * (i + 1)))
        assert r.code == 0, r.err
        return path

    here = {name: piece(name, 0) for name in jobs}
    pinned = numerics.describe(numerics.identity("cpu"))
    with monkeypatch.context() as m:
        fake = _fake_cuda(m)
        for name in jobs:
            r = cli("merge", here[name], piece(name, 1), "--out", tmp_path / f"{name}-merged.safetensors")
            line = _error(r)
            assert f"different numerics ({numerics.describe(numerics.identity_of(fake))} vs {pinned})" in line, line
    code = provenance.code_digest()
    monkeypatch.setattr(provenance, "code_digest", lambda root=None: "0.0.1+" + "f" * 16)
    for name in jobs:
        r = cli("merge", here[name], piece(name, 1), "--out", tmp_path / f"{name}-merged.safetensors")
        assert f"different igd code (0.0.1+{'f' * 16} vs {code})" in _error(r)
    assert not list(tmp_path.glob("*-merged.safetensors"))


def test_pipeline_pieces_of_another_evaluation_are_never_merged(tmp_path, cli, igd_home, monkeypatch):
    """Pieces of a run at --steps 2 are neither merged by `--piece merge` nor reused by a plain run at --steps 3
    (both took them); `--piece merge` of pieces made with other numerics names both in one line."""
    run = tmp_path / "run"
    steps2 = [*OPTS, "--out", run]
    steps3 = [*OPTS, "--steps", "3", "--out", run]
    for p in ("calibrate", "defend:0/2", "defend:1/2"):
        r = cli("pipeline", *steps2, "--piece", p)
        assert r.code == 0, r.err
        assert r.json()["numerics"]["mode"] == "pinned" and "+" in r.json()["igd_code"]  # what the job log shows
    assert "incomplete (none found" in _error(cli("pipeline", *steps3, "--piece", "merge"))
    got = cli("pipeline", *steps3)
    assert got.code == 0, got.err
    assert got.json()["stages"]["defend-eval"] == "computed"
    report = load_artifact(got.json()["paths"]["report"], kind="eval-report")
    assert report.meta["pipeline_identity"]["budgets"]["steps"] == 3
    assert cli("pipeline", *steps2, "--piece", "merge").code == 0  # the pieces themselves are sound

    fake = _fake_cuda(monkeypatch)
    line = _error(cli("pipeline", *steps2, "--piece", "merge"))
    pinned = numerics.describe({"device_type": "cpu", "tf32": False, "deterministic": True})
    assert ".shard-" in line and (f"made with numerics {pinned}, not this run's "
                                  f"{numerics.describe(numerics.identity_of(fake))}") in line, line
