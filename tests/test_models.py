"""Model registry: built-in archs from state-dict files, the real ResNet-18, RobustBench offline paths, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from igd_cli.archs import ARCHS
from igd_cli.errors import IgdError
from igd_cli.models import fingerprint, load_model

from .conftest import SHARED_DATA

ARCH_INPUT = {"resnet18": (3, 32, 32), "preact-resnet18": (3, 32, 32), "wrn-34-10": (3, 32, 32),
              "resnet50": (3, 64, 64), "demo-cnn": (1, 8, 8)}


def _randomize_bn(net: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_arch_round_trip(arch, fmt, tmp_path):
    net = ARCHS[arch].build(7).eval()
    _randomize_bn(net)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = tmp_path / f"model.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DataParallel layout
    else:
        save_file(state, str(path))
    loaded = load_model(str(path), arch=arch)
    assert loaded.num_classes == 7
    assert loaded.fingerprint == fingerprint(net)
    assert loaded.default_layer == ARCHS[arch].default_layer
    x = torch.rand(2, *ARCH_INPUT[arch])
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), net(x), atol=1e-5)


def test_real_resnet18_loads_unchanged(resnet18_path, resnet18):
    from robustbench.model_zoo.architectures.resnet import ResNet18

    ref = ResNet18()
    ref.load_state_dict(torch.load(resnet18_path, map_location="cpu", weights_only=True))
    assert resnet18.fingerprint == fingerprint(ref)
    assert resnet18.default_layer == "layer4" and resnet18.num_classes == 10


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-test-846.safetensors").exists(), reason="needs ../shared/data")
def test_real_resnet18_accuracy_on_shared_cifar10(resnet18):
    from igd_cli.data import load_dataset

    data = load_dataset(str(SHARED_DATA / "cifar10-test-846.safetensors"), "test")
    correct = 0
    with torch.no_grad():
        for b in data.batches(256):
            correct += (resnet18.model(b.x).argmax(1) == b.y).sum().item()
    assert correct / len(data) > 0.90


def test_demo_model_clean_accuracy(demo, digits_test):
    b = digits_test.all()
    with torch.no_grad():
        acc = (demo.model(b.x).argmax(1) == b.y).float().mean().item()
    assert acc > 0.90
    assert demo.eps == pytest.approx(0.2) and demo.dataset == "digits" and demo.default_layer == "block3"


def test_robustbench_checkpoint_in_model_dir_loads_offline(igd_home, monkeypatch):
    """A zoo checkpoint already in $IGD_HOME/models/<dataset>/<threat>/<name>.pt loads with no network."""
    import igd_cli._compat as compat

    monkeypatch.setenv("IGD_OFFLINE", "1")
    compat.import_robustbench()
    import robustbench.utils as rbu

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(rbu, "download_gdrive_new", no_network)
    net = ARCHS["resnet18"].build(10).eval()
    _randomize_bn(net, seed=3)
    path = igd_home / "models" / "cifar10" / "Linf" / "Addepalli2022Efficient_RN18.pt"
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    loaded = load_model("Addepalli2022Efficient_RN18")
    assert loaded.source == "robustbench" and loaded.dataset == "cifar10"
    assert loaded.fingerprint == fingerprint(net)
    assert loaded.eps == pytest.approx(8 / 255) and loaded.default_layer == "layer4"


def test_robustbench_missing_offline_names_path(igd_home, monkeypatch, cli):
    monkeypatch.setenv("IGD_OFFLINE", "1")
    r = cli("layers", "--model", "Addepalli2022Efficient_RN18")
    assert r.code == 2
    want = igd_home / "models" / "cifar10" / "Linf" / "Addepalli2022Efficient_RN18.pt"
    assert r.err.strip() == (f"error: cannot download RobustBench model Addepalli2022Efficient_RN18 (offline?): "
                             f"place its checkpoint at {want}")


def test_torchvision_missing_offline_names_path(monkeypatch, tmp_path, cli):
    monkeypatch.setenv("IGD_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = cli("layers", "--model", "torchvision:resnet18")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert "resnet18-f37072fd.pth" in r.err and str(tmp_path / "torch") in r.err


@pytest.mark.parametrize("args, needle", [
    (["--model", "NoSuchModel_XYZ"], "not in the RobustBench zoo"),
    (["--model", "torchvision:resnet999"], "unknown torchvision model"),
    (["--model", "missing.pt", "--arch", "resnet18"], "no such file"),
    (["--model", "x.pt"], "needs --arch"),
    (["--model", "x.pt", "--arch", "vgg"], "unknown architecture"),
    (["--model", "demo", "--threat-model", "L7"], None),
])
def test_model_errors(cli, tmp_path, args, needle):
    r = cli("layers", *args)
    if needle is None:  # demo ignores the threat model
        assert r.code == 0
        return
    assert r.code == 2, r.err
    assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1
    assert needle in r.err


def test_bad_checkpoints(tmp_path, cli):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    r = cli("layers", "--model", garbage, "--arch", "resnet18", "--dataset", "digits")
    assert r.code == 2 and "weights-only" in r.err
    pickled = tmp_path / "code.pt"
    torch.save({"fn": print}, pickled)  # arbitrary objects are refused by weights_only=True
    r = cli("layers", "--model", pickled, "--arch", "resnet18", "--dataset", "digits")
    assert r.code == 2 and r.err.startswith("error: ")
    demo_file = tmp_path / "demo.safetensors"
    save_file({k: v.contiguous() for k, v in ARCHS["demo-cnn"].build(10).state_dict().items()}, str(demo_file))
    r = cli("layers", "--model", demo_file, "--arch", "resnet18", "--dataset", "digits")
    assert r.code == 2 and "does not match --arch resnet18" in r.err
    r = cli("layers", "--model", demo_file, "--arch", "demo-cnn", "--dataset", "digits", "--json")
    assert r.code == 0 and r.json()["default_layer"] == "block3"
