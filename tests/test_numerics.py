"""--numerics: the flags pinned and fast set in torch (checked through torch's own flags, which exist without a GPU),
the numerics record every results JSON carries, and the option on every command that computes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from igd_cli import numerics

REPO = Path(__file__).resolve().parents[1]
#: every command that computes a figure: each takes --numerics
COMPUTING = (["rank"], ["calibrate-k"], ["attack"], ["defend-eval"], ["pipeline"], ["audit"], ["analyze", "shift"],
             ["analyze", "ablation"], ["analyze", "sweep"])


def test_pinned_sets_tf32_off_and_deterministic_algorithms(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(numerics, "device_name", lambda device: "a GPU")  # no GPU here to ask for its name
    b = torch.backends
    numerics.apply("pinned", "cuda")
    assert b.cudnn.conv.fp32_precision == b.cudnn.rnn.fp32_precision == b.cuda.matmul.fp32_precision == "ieee"
    assert b.cudnn.deterministic and not b.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert not torch.utils.deterministic.fill_uninitialized_memory
    if not torch.cuda.is_initialized():  # cuBLAS reads it when CUDA starts
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == numerics.CUBLAS_WORKSPACE
    rec = numerics.record("cuda")
    assert rec["mode"] == "pinned" and rec["tf32"] is False and rec["deterministic"] is True
    assert numerics.identity_of(rec) == {"device_type": "cuda", "tf32": False, "deterministic": True}

    numerics.apply("fast", "cuda")
    assert b.cudnn.conv.fp32_precision == b.cuda.matmul.fp32_precision == "tf32" and b.cudnn.benchmark
    assert not b.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
    rec = numerics.record("cuda")
    assert rec["mode"] == "fast" and rec["tf32"] is True and rec["deterministic"] is False
    assert numerics.describe(rec) == "fast (cuda with TF32 on and non-deterministic algorithms)"


def test_fast_on_a_cpu_computes_as_pinned(demo):
    """A CPU has no TF32 and no cuDNN: fast sets pinned's flags there, so both share one identity (a cache made
    with either is reused by the other) while the record says what was asked for."""
    numerics.apply("pinned", "cpu")
    pinned = numerics.record("cpu")
    x = torch.rand(8, 1, 8, 8)
    want = demo.model(x)
    numerics.apply("fast", "cpu")
    fast = numerics.record("cpu")
    assert torch.equal(demo.model(x), want)
    assert (pinned["mode"], fast["mode"]) == ("pinned", "fast")
    assert numerics.identity("cpu") == numerics.identity_of(pinned) == {"device_type": "cpu", "tf32": False,
                                                                         "deterministic": True}
    for key in ("device", "torch", "cuda", "cudnn"):
        assert key in fast
    assert fast["torch"] == torch.__version__


def test_every_computing_command_takes_numerics(cli):
    for cmd in COMPUTING:
        r = cli(*cmd, "--help")
        assert r.code == 0 and "--numerics" in r.out, cmd
    r = cli("rank", "--out", "x.safetensors", "--numerics", "turbo")
    assert r.code == 2 and r.err == "error: --numerics turbo: expected pinned or fast\n"


def test_results_json_record_the_numerics_and_the_default_is_applied(cli, tmp_path, igd_home):
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default, as a fresh process has it
    imp = tmp_path / "imp.safetensors"
    r = cli("rank", "--method", "random", "--n-probe", 20, "--out", imp, "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert torch.backends.cudnn.conv.fp32_precision == "ieee" and torch.are_deterministic_algorithms_enabled()
    assert j["numerics"] == numerics.record("cpu") and j["numerics"]["mode"] == "pinned"
    code = j["igd_code"]
    assert code.startswith(f"{__import__('igd_cli').__version__}+")
    mask = tmp_path / "mask.safetensors"
    outs = {
        "calibrate-k": ["--importance", imp, "--k", 4, "--no-rs", "--n-examples", 12, "--out", mask],
        "attack": ["--attack", "fgsm", "--n-examples", 6, "--out", tmp_path / "adv.safetensors"],
        "defend-eval": ["--mask", mask, "--n-examples", 6],
        "analyze sweep": ["--importance", imp, "--over", "k", "--values", "4", "--attack", "none", "--n-examples", 6,
                          "--out", tmp_path / "run"],
        "audit": ["--mask", mask, "--n-examples", 6, "--checks", 9],
    }
    for cmd, args in outs.items():
        r = cli(*cmd.split(), *args, "--numerics", "fast", "--json")
        assert r.code == 0, (cmd, r.err)
        j = r.json()
        assert j["numerics"]["mode"] == "fast" and j["numerics"]["device_type"] == "cpu", cmd
        assert j["igd_code"] == code, cmd
    for path, kind in ((imp, "importance"), (mask, "mask"), (tmp_path / "adv.safetensors", "adversarial")):
        from igd_cli.artifacts import read_metadata

        meta = read_metadata(path)
        assert meta["kind"] == kind and set(numerics.IDENTITY_KEYS) <= set(meta["numerics"]), kind
        assert meta["igd_code"] == code

    # igd report and igd audit name the setting
    assert cli("report", tmp_path).code == 0
    page = (tmp_path / "report.md").read_text()
    assert "Numerics of `imp.safetensors`: pinned (cpu with deterministic algorithms) on cpu" in page
    assert ("Numerics of `adv.safetensors`, `mask.safetensors`: fast (cpu with deterministic algorithms) (the opt-in "
            "for speed") in page
    r = cli("audit", *outs["audit"], "--numerics", "fast")
    assert "numerics: fast (cpu with deterministic algorithms)" in " ".join(r.out.split())


def test_the_cluster_route_passes_numerics_to_every_job(tmp_path, igd_home, capsys):
    spec = importlib.util.spec_from_file_location("plan", REPO / "cluster" / "slurm" / "plan.py")
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    run = tmp_path / "run"
    plan.main([str(run), "2", "--", "--n-examples", "8", "--numerics", "fast", "--attack", "aa"])
    assert json.loads(capsys.readouterr().out.strip())["n_examples"] == 8
    args = (run / "cluster" / "pipeline.args").read_text().split("\n")
    assert args[args.index("--numerics") + 1] == "fast"
