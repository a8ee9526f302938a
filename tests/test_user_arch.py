"""The user's own architecture (--arch MODULE:CALLABLE / FILE.py:CALLABLE) and --normalize: loading, the class
count, the fingerprint, one-line errors, and every command end to end on a traceable and an fx-untraceable model."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from igd_cli.artifacts import load_artifact
from igd_cli.calibrate import CALIBRATION_STREAM
from igd_cli.errors import IgdError
from igd_cli.models import fingerprint, load_model

NETS = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Tiny(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(12, num_classes)

        def forward(self, x):
            return self.head(self.body(self.features(x)).mean((2, 3)))


    class Untraceable(Tiny):
        def forward(self, x):
            a = self.features(x)
            if float(a.sum()) > -1e30:  # data-dependent control flow: torch.fx cannot trace this
                a = a * 1.0
            return self.head(self.body(a).mean((2, 3)))


    def tiny(num_classes):  # num_classes without a default: igd must read it from the checkpoint first
        return Tiny(num_classes)


    def untraceable(num_classes=10):
        return Untraceable(num_classes)


    def ten_classes():  # no num_classes parameter
        return Tiny(10)


    def not_a_module(num_classes=10):
        return [num_classes]


    def broken(num_classes=10):
        raise RuntimeError("cannot build")


    CONSTANT = 3
''')


@pytest.fixture
def nets(tmp_path):
    path = tmp_path / "mynets.py"
    path.write_text(NETS)
    return path


def _weights(tmp_path, num_classes=7, cls="Tiny", fmt="pt", seed=0):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mynets_ref", tmp_path / "mynets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(seed)
    net = getattr(mod, cls)(num_classes).eval()
    bn = net.features[1]
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 1.5)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"{cls}-{num_classes}.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DataParallel + wrapper
    else:
        save_file(state, str(path))
    return net, path


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_file_arch_builds_the_network_and_reads_the_class_count(nets, tmp_path, fmt):
    net, path = _weights(tmp_path, 7, fmt=fmt)
    x = torch.rand(3, 1, 8, 8)
    for callable_name in ("tiny", "Tiny"):  # a factory needing num_classes, a class with a default
        loaded = load_model(str(path), arch=f"{nets}:{callable_name}")
        assert loaded.num_classes == 7 and loaded.fingerprint == fingerprint(net)
        assert loaded.info["arch"] == f"{nets}:{callable_name}"
        with torch.no_grad():
            assert torch.equal(loaded.model(x), net(x))


def test_module_arch_imports_from_the_working_directory(nets, tmp_path, monkeypatch):
    net, path = _weights(tmp_path, 10)
    monkeypatch.chdir(tmp_path)
    loaded = load_model(str(path), arch="mynets:ten_classes")
    assert loaded.num_classes == 10 and loaded.fingerprint == fingerprint(net)


def test_normalize_wraps_and_is_part_of_the_fingerprint(nets, tmp_path):
    net, path = _weights(tmp_path, 7)
    plain = load_model(str(path), arch=f"{nets}:Tiny")
    norm = load_model(str(path), arch=f"{nets}:Tiny", normalize="0.5,0.25")
    other = load_model(str(path), arch=f"{nets}:Tiny", normalize="mnist")
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(norm.model(x), net((x - 0.5) / 0.25), atol=1e-6)
    assert len({plain.fingerprint, norm.fingerprint, other.fingerprint}) == 3
    assert norm.info["normalize"] == {"mean": [0.5], "std": [0.25]}
    for bad, msg in (("0.5", "MEAN,STD"), ("0.1,0.2,0.3", "MEAN,STD"), ("0.5,0", "std must be > 0"),
                     ("imagenet", "first convolution takes 1"), ("a,b", "MEAN,STD")):
        with pytest.raises(IgdError, match=msg):
            load_model(str(path), arch=f"{nets}:Tiny", normalize=bad)
    with pytest.raises(IgdError, match="state-dict file"):
        load_model("demo", normalize="mnist")


def test_bad_arch_is_one_error_line(nets, tmp_path, cli):
    _, path = _weights(tmp_path, 7)
    _, other = _weights(tmp_path, 7, cls="Untraceable", seed=1)
    save_file({"conv.weight": torch.zeros(4, 1, 3, 3), "head.weight": torch.zeros(7, 12)},
              str(tmp_path / "wrong.safetensors"))
    cases = [
        (path, "nosuchmodule_igd:Net", "no module named 'nosuchmodule_igd'"),
        (path, f"{tmp_path / 'missing.py'}:Tiny", "no such file"),
        (path, f"{nets}:Nope", "has no attribute 'Nope'"),
        (path, f"{nets}:CONSTANT", "not callable"),
        (path, f"{nets}:not_a_module", "not a torch.nn.Module"),
        (path, f"{nets}:broken", "failed (RuntimeError: cannot build)"),
        (path, f"{nets}:ten_classes", "head.weight has 7 classes"),
        (path, "json:", "MODULE:CALLABLE"),
        (tmp_path / "wrong.safetensors", f"{nets}:Tiny", "missing keys"),
    ]
    for weights, arch, msg in cases:
        r = cli("layers", "--model", weights, "--arch", arch, "--dataset", "digits")
        lines = r.err.strip().splitlines()
        assert r.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (arch, r.err)
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def f(:\n")
    r = cli("layers", "--model", path, "--arch", f"{syntax}:f", "--dataset", "digits")
    assert r.code == 2 and "importing" in r.err and "SyntaxError" in r.err and len(r.err.strip().splitlines()) == 1
    nokey = tmp_path / "nokey.safetensors"
    save_file({"features.0.weight": torch.zeros(8, 1, 3, 3)}, str(nokey))
    r = cli("layers", "--model", nokey, "--arch", f"{nets}:Tiny", "--dataset", "digits")
    assert r.code == 2 and "no 'head.weight' in the state dict" in r.err


SMALL_CLIP = "ViT-S-32"


@pytest.mark.parametrize("cls, factory", [("Tiny", "tiny"), ("Untraceable", "untraceable")])
def test_every_command_with_a_user_architecture(nets, tmp_path, cli, igd_home, cls, factory):
    _, weights = _weights(tmp_path, 10, cls=cls)
    model = ["--model", weights, "--arch", f"{nets}:{factory}", "--normalize", "0.3,0.3", "--dataset", "digits",
             "--device", "cpu"]
    imps = {}
    methods = [("lo-ir", []), ("random", [])]
    if cls == "Untraceable":  # CD-IR once (CLIP is the slow part), through the hook fallback
        methods.append(("cd-ir", ["--clip-model", SMALL_CLIP, "--clip-pretrained", "none",
                                  "--clip-cache", tmp_path / "clip.safetensors"]))
    for method, extra in methods:
        imps[method] = tmp_path / f"imp-{method}.safetensors"
        r = cli("rank", *model, "--layer", "body", "--method", method, "--n-probe", 40, "--batch-size", 20,
                "--out", imps[method], *extra, "--json")
        assert r.code == 0, (method, r.err)
        assert r.json()["shape"] == [12, 10] and r.json()["layer"] == "model.body"
    mask = tmp_path / "mask.safetensors"
    r = cli("calibrate-k", *model, "--importance", imps["lo-ir"], "--eps", "0.1", "--n-examples", 30, "--out", mask,
            "--json")
    assert r.code == 0, r.err
    cal = r.json()
    assert cal["fast_tail"] == (cls == "Tiny") and 1 <= cal["k"] <= 12
    # calibrate-k's clean accuracy is one draw on its own stream (seed 0 XOR CALIBRATION_STREAM): defend-eval on the
    # forward (hook fallback for the untraceable model) reproduces it exactly on that stream, scored once
    r = cli("defend-eval", *model, "--mask", mask, "--eps", "0.1", "--n-examples", 30, "--protocol", "single-draw",
            "--seed", CALIBRATION_STREAM, "--json")
    assert r.code == 0, r.err
    assert r.json()["clean_accuracy"] == cal["clean_accuracy"] and r.json()["draws"] == 1
    r = cli("defend-eval", *model, "--mask", mask, "--eps", "0.1", "--n-examples", 30, "--json")
    assert r.code == 0, r.err
    clean = r.json()["scores"]["defended"]["clean"]
    assert r.json()["draws"] == 5 and r.json()["randomized"] and len(clean["per_draw"]) == 5
    assert r.json()["clean_accuracy"] == pytest.approx(sum(clean["per_draw"]) / (5 * 30))
    r = cli("attack", *model, "--mask", mask, "--attack", "apgd-ce", "--steps", 2, "--eps", "0.1",
            "--n-examples", 8, "--out", tmp_path / "adv.safetensors", "--json")
    assert r.code == 0, r.err
    assert load_artifact(tmp_path / "adv.safetensors", kind="adversarial")["x_adv"].shape == (8, 1, 8, 8)
    r = cli("defend-eval", *model, "--mask", mask, "--attack", "apgd-ce", "--steps", 2, "--eps", "0.1",
            "--n-examples", 8, "--workdir", tmp_path / "wd", "--json")
    assert r.code == 0, r.err
    ev = r.json()
    assert set(ev["robust_accuracy"]) == {"apgd-ce"} and ev["n_examples"] == 8 and ev["draws"] == 5
    assert len(ev["scores"]["defended"]["apgd-ce"]["per_draw"]) == 5
    assert list((tmp_path / "wd").rglob("*.safetensors"))  # the attacked set was written for reuse
    # the mask is bound to the normalised model: without --normalize the fingerprint differs
    plain = [a for a in model if a not in ("--normalize", "0.3,0.3")]
    r = cli("defend-eval", *plain, "--mask", mask, "--eps", "0.1", "--n-examples", 8)
    assert r.code == 2 and "fingerprint" in r.err
    r = cli("pipeline", *model, "--layer", "body", "--eps", "0.1", "--n-probe", 40, "--n-examples", 8,
            "--steps", 2, "--queries", 20, "--eot-iter", 1, "--restarts", 1, "--batch-size", 32,
            "--out", tmp_path / "run", "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["layer"] == "model.body" and res["worst_case"] is not None
    assert {"aa", "rays", "apgd-eot", "tr-apgd-ce"} <= set(res["robust_accuracy"])
    r = cli("audit", *model, "--mask", mask, "--eps", "0.1", "--n-examples", 8, "--checks", "1,9", "--json")
    assert r.code == 0, r.err
    assert [c["id"] for c in r.json()["checks"]] == [1, 9]
    r = cli("analyze", "sweep", *model, "--importance", imps["lo-ir"], "--over", "k", "--values", "1,2",
            "--attack", "none", "--eps", "0.1", "--n-examples", 8, "--out", tmp_path / "an", "--json")
    assert r.code == 0, r.err
    points = r.json()["points"]
    assert [p["value"] for p in points] == [1, 2]
    for p in points:  # each point is a real evaluation: 5 draws whose mean is the figure, the same base model
        assert p["draws"] == 5 and len(p["clean_per_draw"]) == 5
        assert p["clean"] == pytest.approx(sum(p["clean_per_draw"]) / 5)
    assert points[0]["base_clean"] == points[1]["base_clean"]


def test_example_mnist_cnn_builds(tmp_path):
    """The README's example architecture file (examples/mnist_cnn.py) loads with random weights."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    arch = f"{root / 'examples' / 'mnist_cnn.py'}:small_cnn"
    from igd_cli.user_arch import resolve_callable

    net = resolve_callable(arch)(num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    loaded = load_model(str(path), arch=arch, normalize="mnist")
    assert loaded.num_classes == 10 and loaded.default_layer == "model.block3"  # found like a ResNet's layer4
    assert loaded.model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
