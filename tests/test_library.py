"""igd as a Python library: ``import igd_cli`` is light and every public name imports and carries a usage example;
the library calls give what the commands' code paths give (the same importance, mask, k and figures); attack sets
of in-memory defences are kept apart; and docs/library.md runs top to bottom as a reader runs it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "library.md"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The demo model's tiny forwards are dominated by thread synchronisation on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_import_is_light_and_every_public_name_imports():
    """In a fresh interpreter: ``import igd_cli`` imports neither torch nor any igd module; then every name of
    ``__all__`` resolves (``from igd_cli import *`` too), and an unknown name is an AttributeError."""
    script = (
        "import sys\n"
        "import igd_cli\n"
        "heavy = sorted(m for m in sys.modules if m in ('torch', 'numpy', 'typer') or m.startswith('igd_cli.'))\n"
        "assert not heavy, heavy\n"
        "missing = [n for n in igd_cli.__all__ if getattr(igd_cli, n, None) is None]\n"
        "assert not missing, missing\n"
        "ns = {}\n"
        "exec('from igd_cli import *', ns)\n"
        "assert set(igd_cli.__all__) <= set(ns), set(igd_cli.__all__) - set(ns)\n"
        "assert set(igd_cli.__all__) <= set(dir(igd_cli))\n"
        "try:\n"
        "    igd_cli.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr[-3000:]


def test_the_public_names_are_the_modules_own_objects():
    """Re-exports, not second implementations: each name is the object its module defines."""
    import importlib

    import igd_cli

    for name, module in igd_cli._EXPORTS.items():
        assert getattr(igd_cli, name) is getattr(importlib.import_module(module, "igd_cli"), name), name


# --- the library calls against the commands' code paths ------------------------------------------------------

@pytest.fixture(scope="module")
def target():
    import igd_cli

    return igd_cli.open_target("demo", device="cpu")


def test_rank_neurons_is_the_method_and_writes_the_artifact_igd_rank_writes(target, tmp_path, cli, igd_home):
    import igd_cli
    from igd_cli.artifacts import load_artifact
    from igd_cli.ranking.random_ir import random_importance

    probe = target.data("train", 64)
    imp = igd_cli.rank_neurons(target, probe, "random", seed=3)
    assert torch.equal(imp, random_importance(128, 10, 3, (0, 128)))
    lo = igd_cli.rank_neurons(target, probe, "lo-ir", out=tmp_path / "imp.safetensors")
    r = cli("rank", "--model", "demo", "--n-probe", "64", "--out", tmp_path / "imp-cli.safetensors", "--json")
    assert r.code == 0, r.err
    cli_art = load_artifact(tmp_path / "imp-cli.safetensors", kind="importance")
    assert torch.equal(lo, cli_art["importance"])
    lib_art = load_artifact(tmp_path / "imp.safetensors", kind="importance")
    for key in ("model_fingerprint", "layer", "method", "data_id", "params"):
        assert lib_art.meta[key] == cli_art.meta[key], key


def test_defense_from_ranking_is_the_top_k_mask_with_sigma_eps_over_2(target):
    import igd_cli
    from igd_cli.defense import topk_mask

    imp = torch.rand(128, 10, generator=torch.Generator().manual_seed(0))
    d = igd_cli.defense_from_ranking(target, imp, 16)
    assert d.layer == "block3" and d.k == 16 and d.sigma == target.default_eps() / 2 and d.randomized
    assert torch.equal(d.mask.to(torch.uint8), topk_mask(imp, 16))
    assert igd_cli.defense_from_ranking(target, imp, 16, rs=False).sigma is None
    assert igd_cli.defense_from_ranking(target, imp, 16, eps=0.1).sigma == 0.05
    with pytest.raises(igd_cli.IgdError, match="does not fit layer block3"):
        igd_cli.defense_from_ranking(target, imp[:64], 16)


def test_calibrate_defense_chooses_the_k_calibrate_k_chooses(target, tmp_path, igd_home):
    """The in-memory route and the file route (``igd calibrate-k`` as a library call) give the same k, the same
    accuracies and the same mask, on a ranking where k matters."""
    import igd_cli
    from igd_cli.artifacts import load_artifact, save_artifact

    imp = torch.rand(128, 10, generator=torch.Generator().manual_seed(1))
    meta = {**target.provenance(), "layer": "block3", "method": "random", "n_neurons": 128}
    save_artifact(tmp_path / "imp.safetensors", "importance", {"importance": imp}, meta)
    images = target.data("test", 48)
    d = igd_cli.calibrate_defense(target, imp, images, tolerance=0.0, seed=2)
    r = igd_cli.run_calibration(target, tmp_path / "imp.safetensors", tmp_path / "mask.safetensors",
                                n_examples=48, tolerance=0.0, seed=2, batch_size=128)
    assert 1 < r["k"] < 128  # a search that had to decide
    assert d.k == d.calibration.k == r["k"]
    assert d.calibration.accuracy == r["clean_accuracy"]
    assert d.calibration.base_accuracy == r["base_clean_accuracy"]
    assert d.calibration.curve == r["curve"]
    assert torch.equal(d.mask.to(torch.uint8), load_artifact(tmp_path / "mask.safetensors")["mask"])
    # from the importance file, the layer comes from the file
    assert igd_cli.calibrate_defense(target, tmp_path / "imp.safetensors", images, tolerance=0.0, seed=2).k == d.k


def test_evaluate_defense_keeps_in_memory_defences_sets_apart(target, tmp_path):
    """Two in-memory defences evaluated in one work folder: each gets its own attack set (the raw
    ``igd_cli.evaluate.evaluate_defense`` without ``defense_meta`` keys both alike and scores the second
    defence on the first one's set)."""
    import igd_cli

    imp = torch.rand(128, 10, generator=torch.Generator().manual_seed(0))
    images = target.data("test", 8)
    work = tmp_path / "adv"
    a, b = (igd_cli.defense_from_ranking(target, imp, k) for k in (8, 64))
    res_a = igd_cli.evaluate_defense(target, a, images, "fgsm", workdir=work, show_progress=False)
    res_b = igd_cli.evaluate_defense(target, b, images, "fgsm", workdir=work, show_progress=False)
    assert res_a.sets["fgsm"] != res_b.sets["fgsm"]
    assert len(list(work.glob("defended-fgsm-*.safetensors"))) == 2
    fresh = igd_cli.evaluate_defense(target, b, images, "fgsm", workdir=None, show_progress=False)
    assert torch.equal(res_b.defended["fgsm"], fresh.defended["fgsm"])
    # an in-memory defence is keyed by its masks (their sha256) and its settings
    meta = igd_cli.defense_meta(a)
    assert meta["layer"] == "block3" and meta["settings"] == a.settings() and len(meta["mask_sha256"]) == 64


def test_a_defence_igd_cannot_identify_keeps_no_sets(target, tmp_path, igd_home):
    import igd_cli

    class Shifted(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x) + 0.0

    images = target.data("test", 4)
    res = igd_cli.evaluate_defense(target, Shifted(target.model), images, "fgsm", show_progress=False)
    assert res.sets["fgsm"] == "" and not (igd_home / "adv").exists()
    with pytest.raises(igd_cli.IgdError, match="cannot tell this defence"):
        igd_cli.evaluate_defense(target, Shifted(target.model), images, "fgsm", workdir=tmp_path / "adv")
    named = igd_cli.evaluate_defense(target, Shifted(target.model), images, "fgsm", workdir=tmp_path / "adv",
                                     defense_meta={"module": "Shifted", "source": "test"}, show_progress=False)
    assert Path(named.sets["fgsm"]).is_file()


# --- docs/library.md, top to bottom ----------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def page_blocks(text: str) -> list[tuple[str, int, str]]:
    """(language, first line, code) of every fenced block of the page, in order."""
    return [(m.group(1), text[:m.start()].count("\n") + 2, m.group(2)) for m in FENCE.finditer(text)]


def test_the_library_page_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every ```python block of docs/library.md runs in one namespace, and every ``igd`` line of its ```bash
    blocks runs with igd's parser, in page order, in a fresh folder with igd's home in it, offline."""
    from igd_cli.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IGD_HOME", str(tmp_path / "igd_home"))
    for var, val in (("IGD_OFFLINE", "1"), ("IGD_NO_PROGRESS", "1"), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(var, val)
    blocks = page_blocks(PAGE.read_text())
    langs = [lang for lang, _, _ in blocks]
    assert langs.count("python") >= 6 and "bash" in langs
    namespace: dict = {"__name__": "library_page"}
    for lang, line, code in blocks:
        where = f"docs/library.md:{line}"
        if lang == "python":
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(compile(code, where, "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{where}: the block fails: {type(exc).__name__}: {exc}") from exc
            if "print(" in code:
                assert out.getvalue().strip(), f"{where}: printed nothing"
        elif lang == "bash":
            for cmd in code.splitlines():
                words = shlex.split(cmd)
                if words and words[0] == "igd":
                    assert main(words[1:]) == 0, f"{where}: {cmd}"
    info = json.loads((tmp_path / "model-info.json").read_text())
    assert info == namespace["info"]
    assert info["external"] is not None and info["eps"] == "0.2"


def test_the_page_blocks_are_found_with_their_lines():
    text = "# t\n\n```python\nx = 1\n```\n\ntext\n```bash\nigd layers\n```\n"
    assert page_blocks(text) == [("python", 4, "x = 1\n"), ("bash", 9, "igd layers\n")]
