"""Artifacts: round trip with provenance, atomic writes, validation errors, igd inspect."""

from __future__ import annotations

import os

import pytest
import torch

from igd_cli import __version__
from igd_cli.artifacts import load_artifact, read_metadata, save_artifact
from igd_cli.errors import IgdError


def _importance(path, fp="abc123", layer="layer4"):
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    save_artifact(path, "importance", {"importance": t},
                  {"model": "m", "model_fingerprint": fp, "layer": layer, "method": "random",
                   "data": {"dataset": "digits", "split": "train", "n": 5}, "params": {"seed": 0}})
    return t


def test_round_trip(tmp_path):
    path = tmp_path / "imp.safetensors"
    t = _importance(path)
    art = load_artifact(path, kind="importance", fingerprint="abc123", layer="layer4")
    assert torch.equal(art["importance"], t)
    assert art.kind == "importance" and art.meta["igd_version"] == __version__ and art.meta["format_version"] == 1
    assert art.meta["data"] == {"dataset": "digits", "split": "train", "n": 5} and "created" in art.meta
    assert read_metadata(path)["params"] == {"seed": 0}


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "imp.safetensors"

    def killed(*a, **k):
        raise KeyboardInterrupt  # the job dies between writing the temp file and the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _importance(path)
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_whole_file(tmp_path):
    path = tmp_path / "imp.safetensors"
    _importance(path, fp="first")
    _importance(path, fp="second")
    assert load_artifact(path).meta["model_fingerprint"] == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["imp.safetensors"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"fingerprint": "other"}, "not for this model (other)"),
    ({"layer": "layer3"}, "made for layer 'layer4', not 'layer3'"),
    ({"kind": "mask"}, "expected a mask artifact, found importance"),
])
def test_validation_errors(tmp_path, kwargs, needle):
    path = tmp_path / "imp.safetensors"
    _importance(path)
    with pytest.raises(IgdError) as err:
        load_artifact(path, **kwargs)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "imp.safetensors"
    _importance(path)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 20])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for bad in (trunc, garbage, empty):
        with pytest.raises(IgdError, match="not a readable safetensors file"):
            load_artifact(bad, kind="importance")
    with pytest.raises(IgdError, match="no such file"):
        load_artifact(tmp_path / "missing.safetensors")
    with pytest.raises(IgdError, match="is a directory"):
        load_artifact(tmp_path)


def test_missing_tensor_and_foreign_file(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"note": "plain"})
    with pytest.raises(IgdError, match="not an igd artifact"):
        load_artifact(foreign, kind="importance")
    assert load_artifact(foreign).meta == {"note": "plain"}  # metadata of other tools is kept as strings
    fake = tmp_path / "fake.safetensors"
    save_file({"w": torch.zeros(2)}, str(fake), metadata={"kind": '"importance"'})
    with pytest.raises(IgdError, match="lacks tensor"):
        load_artifact(fake, kind="importance")


def test_inspect_cli(tmp_path, cli):
    path = tmp_path / "imp.safetensors"
    _importance(path)
    r = cli("inspect", path, "--json")
    assert r.code == 0
    d = r.json()
    assert d["kind"] == "importance" and d["tensors"]["importance"] == {"shape": [4, 3], "dtype": "F32"}
    assert d["metadata"]["layer"] == "layer4"
    r = cli("inspect", path)
    assert r.code == 0 and "importance" in r.out and "model_fingerprint" in r.out
    r = cli("inspect", tmp_path / "nope.safetensors")
    assert r.code == 2 and r.err.strip() == f"error: {tmp_path / 'nope.safetensors'}: no such file"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"12345678garbage")
    r = cli("inspect", junk)
    assert r.code == 2 and r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1


def test_an_output_that_is_a_directory_is_one_error_line(tmp_path, cli):
    r = cli("rank", "--out", tmp_path, "--n-probe", "20", "--device", "cpu")
    assert r.code == 2 and "is a directory" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_take_the_umask_not_owner_only(tmp_path, umask):
    """An artifact's mode is what a plain open() gives under the umask (0644 under 022, group-writable under 002),
    not mkstemp's owner-only 0600: a run folder shared by a group stays readable by it."""
    old = os.umask(umask)
    try:
        path = tmp_path / "a.safetensors"
        save_artifact(path, "importance", {"importance": torch.zeros(3, 2)}, {"n_neurons": 3, "num_classes": 2})
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask == (tmp_path / "plain").stat().st_mode & 0o777
