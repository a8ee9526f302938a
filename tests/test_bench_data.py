"""The benchmarks find their data in the repository's own terms (--data-dir, else $IGD_DATA_DIR, else
$IGD_HOME/data), never at a path outside it, and say in one line which file to place where when it is absent."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _data  # noqa: E402


def test_data_folder_order(tmp_path, monkeypatch):
    monkeypatch.setenv("IGD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IGD_DATA_DIR", raising=False)
    name = "cifar10-test-846.safetensors"
    for d in ("home/data", "env", "arg"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / name).write_bytes(b"x")
    assert _data.data_file(name) == tmp_path / "home" / "data" / name
    monkeypatch.setenv("IGD_DATA_DIR", str(tmp_path / "env"))
    assert _data.data_file(name) == tmp_path / "env" / name
    assert _data.data_file(name, tmp_path / "arg") == tmp_path / "arg" / name
    assert _data.find_data_file("absent.safetensors", tmp_path / "arg") is None


def test_absent_data_is_one_line_naming_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _data.data_file("cifar10-train-4660.safetensors", tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cifar10-train-4660.safetensors not found: place it in {tmp_path}")


def test_reproduce_refuses_before_any_work_without_its_data(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce.py"), "--data-dir", str(tmp_path),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert "cifar10-train-4660.safetensors not found" in r.stderr and not (tmp_path / "out").exists()


def test_no_code_default_points_outside_the_repository():
    """Issue 24.3: no code default names ../shared or an absolute /work path (tests may still use ../shared)."""
    bad = []
    for folder in ("igd_cli", "scripts", "benchmarks", "cluster", "examples"):
        for p in (ROOT / folder).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".sh", ".sbatch", ".md", ".toml", ".yml", ".yaml", ""):
                for n, line in enumerate(p.read_text(errors="ignore").splitlines(), 1):
                    if re.search(r"\.\./shared|/work/|[\"']shared[\"']\s*/", line):
                        bad.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_reproduce_merges_per_model_parts_and_refuses_overlap():
    import reproduce

    part = {"mode": "quick", "tag": "t", "argv": ["--quick", "--models", "demo"], "date": "d", "minutes": 2.0,
            "load_end": [1.0], "models": {"demo": {}}}
    other = {**part, "argv": ["--quick", "--models", "resnet18"], "minutes": 5.0, "load_end": [3.0],
             "models": {"resnet18": {}}}
    R = reproduce.merge([part, other])
    assert list(R["models"]) == ["demo", "resnet18"] and R["minutes"] == 5.0 and R["load_end"] == [3.0]
    assert R["argv"] == ["--quick"] and [p["models"] for p in R["parts"]] == [["demo"], ["resnet18"]]
    with pytest.raises(SystemExit):
        reproduce.merge([part, part])
    with pytest.raises(SystemExit):
        reproduce.merge([part, {**other, "mode": "default"}])


def test_results_files_name_no_path_of_the_machine(tmp_path, monkeypatch):
    """A results file names the repository's files relative to it, the benchmarks' data files by name (with their
    sha256 and the recipe that makes them), pyautoattack's model inside its package, scratch folders under
    $TMPDIR and the data folder as $IGD_DATA_DIR: nothing that exists only on the machine that ran it."""
    import json
    import tempfile

    import pyautoattack

    data = tmp_path / "somewhere" / "data"
    model = Path(pyautoattack.__file__).resolve().parent / "examples" / "model_test.pt"
    scratch = Path(tempfile.gettempdir()) / "bench-xyz"
    obj = {"command": f"python benchmarks/bench_adaptive.py --model {model} --arch {ROOT}/examples/mnist_cnn.py:"
                      f"small_cnn --dataset {data}/cifar10-test-846.safetensors --workdir {scratch}/wd --out x.json",
           "sets": [f"{scratch}/wd/defended-aa-1.safetensors"], "data_dir": str(data),
           "near": f"{tempfile.gettempdir()}x/not-the-temp-folder", "n": 3}
    out = _data.write_results(tmp_path / "r.json", obj, data)
    assert json.loads((tmp_path / "r.json").read_text()) == out
    assert out["command"] == ("python benchmarks/bench_adaptive.py --model pyautoattack/examples/model_test.pt "
                              "--arch examples/mnist_cnn.py:small_cnn --dataset cifar10-test-846.safetensors "
                              "--workdir $TMPDIR/bench-xyz/wd --out x.json")
    assert out["sets"] == ["$TMPDIR/bench-xyz/wd/defended-aa-1.safetensors"] and out["data_dir"] == "$IGD_DATA_DIR"
    assert out["near"] == obj["near"] and out["n"] == 3  # only whole folder names are replaced
    assert out["data_files"] == {"cifar10-test-846.safetensors": {
        "sha256": _data.SUBSETS["cifar10-test-846.safetensors"].sha256,
        "made_by": "igd fetch --dataset cifar10 && python benchmarks/make_subsets.py"}}
    listed = _data.write_results(tmp_path / "l.json", [{"dataset": f"{data}/cifar10-train-4660.safetensors"}, {}], data)
    assert listed[0]["dataset"] == "cifar10-train-4660.safetensors" and "data_files" in listed[0]
    assert listed[1] == {}
