"""Model registry: built-in archs from state-dict files, the real ResNet-18, RobustBench offline paths, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from igd_cli.archs import ARCHS
from igd_cli.artifacts import read_metadata
from igd_cli.errors import IgdError
from igd_cli.models import fingerprint, load_model

from .conftest import SHARED_DATA, cifar_safetensors

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


ZOO_RN18 = "Addepalli2022Efficient_RN18"  # a ResNet-18 entry, listed under cifar10 and cifar100 (Linf)


@pytest.fixture
def offline_zoo(igd_home, monkeypatch):
    """$IGD_HOME with no network: robustbench may read checkpoints from the model dir but never download."""
    import igd_cli._compat as compat

    monkeypatch.setenv("IGD_OFFLINE", "1")
    compat.import_robustbench()
    import robustbench.utils as rbu

    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(rbu, "download_gdrive_new", no_network)
    return igd_home


def place_zoo_checkpoint(igd_home, dataset: str = "cifar10", num_classes: int = 10, seed: int = 3) -> torch.nn.Module:
    """A randomly initialised ResNet-18 (the architecture of the zoo's ResNet-18 entries) saved where robustbench's
    ``load_model`` reads a local checkpoint: ``<model dir>/<dataset>/Linf/<name>.pt``, a plain state dict."""
    net = ARCHS["resnet18"].build(num_classes).eval()
    _randomize_bn(net, seed=seed)
    path = igd_home / "models" / dataset / "Linf" / f"{ZOO_RN18}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


def test_robustbench_checkpoint_in_model_dir_loads_offline(offline_zoo):
    """A zoo checkpoint already in $IGD_HOME/models/<dataset>/<threat>/<name>.pt loads with no network."""
    net = place_zoo_checkpoint(offline_zoo)
    loaded = load_model(ZOO_RN18)
    assert loaded.source == "robustbench" and loaded.dataset == "cifar10"
    assert loaded.fingerprint == fingerprint(net)
    assert loaded.eps == pytest.approx(8 / 255) and loaded.default_layer == "layer4"
    assert loaded.input_shape == (3, 32, 32)


def test_zoo_model_with_tensor_file_data(offline_zoo, cli, tmp_path):
    """Issue 14.1: the zoo says the entry's data set (classes, ε, layer); --dataset FILE only gives the images."""
    net = place_zoo_checkpoint(offline_zoo)
    data = cifar_safetensors(tmp_path, n=8)
    imp = tmp_path / "imp.safetensors"
    r = cli("rank", "--model", ZOO_RN18, "--dataset", data, "--out", imp, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert j["layer"] == "layer4" and j["shape"] == [512, 10] and j["n_probe"] == 8
    meta = read_metadata(imp)
    assert meta["model_fingerprint"] == fingerprint(net) and meta["dataset"] == str(data)
    assert meta["data"]["dataset"] == str(data)
    r = cli("attack", "--model", ZOO_RN18, "--dataset", data, "--attack", "fgsm", "--n-examples", 4,
            "--out", tmp_path / "adv.safetensors", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert r.json()["eps"] == pytest.approx(8 / 255)  # the zoo entry's ε (CIFAR-10, Linf), not the file's


def test_zoo_entry_resolution(offline_zoo):
    """A name listed under several data sets: --zoo-dataset, else --dataset when it is one of them, else the one
    local checkpoint, else the zoo's order; a data-set-less hint (a file) does not count."""
    from igd_cli.models import robustbench_entry

    e = robustbench_entry(ZOO_RN18)
    assert (e.dataset, e.threat_model, e.chosen_by) == ("cifar10", "Linf", "zoo order")
    assert e.listed_under == ("cifar10", "cifar100")
    assert robustbench_entry(ZOO_RN18, prefer="cifar100").dataset == "cifar100"
    assert robustbench_entry(ZOO_RN18, prefer="/data/test.safetensors").chosen_by == "zoo order"
    place_zoo_checkpoint(offline_zoo, "cifar100", 100)
    e = robustbench_entry(ZOO_RN18)
    assert (e.dataset, e.chosen_by) == ("cifar100", "local checkpoint")
    assert e.checkpoint() == offline_zoo / "models" / "cifar100" / "Linf" / f"{ZOO_RN18}.pt"
    place_zoo_checkpoint(offline_zoo, "cifar10", 10)
    assert robustbench_entry(ZOO_RN18).chosen_by == "zoo order"
    e = robustbench_entry(ZOO_RN18, zoo_dataset="cifar100", prefer="cifar10")
    assert (e.dataset, e.chosen_by) == ("cifar100", "--zoo-dataset")
    with pytest.raises(IgdError, match="not listed under --zoo-dataset imagenet.*cifar10, cifar100"):
        robustbench_entry(ZOO_RN18, zoo_dataset="imagenet")
    with pytest.raises(IgdError, match="--zoo-dataset mnist: expected one of cifar10, cifar100, imagenet"):
        robustbench_entry(ZOO_RN18, zoo_dataset="mnist")


def test_zoo_dataset_option(offline_zoo, cli, tmp_path):
    """--zoo-dataset on the command line; an ambiguous name without it says which entry it used; a class mismatch
    suggests --zoo-dataset; --zoo-dataset is refused for a model that is not a zoo name."""
    place_zoo_checkpoint(offline_zoo, "cifar10", 10)
    place_zoo_checkpoint(offline_zoo, "cifar100", 100, seed=4)
    r = cli("layers", "--model", ZOO_RN18, "--zoo-dataset", "cifar100", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert {row["layer"]: row["shape"] for row in r.json()["layers"]}["linear"] == [100]
    assert "note:" not in r.err
    r = cli("layers", "--model", ZOO_RN18, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert {row["layer"]: row["shape"] for row in r.json()["layers"]}["linear"] == [10]
    assert "listed under cifar10 and cifar100" in r.err and "--zoo-dataset" in r.err
    data100 = cifar_safetensors(tmp_path, n=8, classes=100)
    r = cli("rank", "--model", ZOO_RN18, "--dataset", data100, "--out", tmp_path / "i.safetensors", "--device", "cpu")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 2  # the note, then the error
    assert r.err.strip().splitlines()[1].startswith("error: --dataset")
    assert "has 100 classes but the model predicts 10" in r.err and "pass --zoo-dataset" in r.err
    r = cli("layers", "--model", "demo", "--zoo-dataset", "cifar10")
    assert r.code == 2 and "only for RobustBench zoo names" in r.err


def test_layers_needs_no_data(offline_zoo, cli, resnet18_path):
    """Issue 14.4: igd layers takes the input shape from the zoo entry or architecture (no CIFAR-10 archive, no
    --dataset), or from --input-shape."""
    place_zoo_checkpoint(offline_zoo)
    assert not (offline_zoo / "data").exists()
    r = cli("layers", "--model", ZOO_RN18, "--device", "cpu", "--json")
    assert r.code == 0, r.err
    j = r.json()
    assert j["input_shape"] == [3, 32, 32]
    assert {row["layer"]: row["shape"] for row in j["layers"]}["layer4"] == [512, 4, 4]
    r = cli("layers", "--model", resnet18_path, "--arch", "resnet18", "--device", "cpu", "--json")
    assert r.code == 0, r.err
    assert r.json()["input_shape"] == [3, 32, 32] and r.json()["default_layer"] == "layer4"
    r = cli("layers", "--input-shape", "1,16,16", "--json")  # the demo CNN pools globally: any size runs
    assert r.code == 0, r.err
    assert {row["layer"]: row["shape"] for row in r.json()["layers"]}["block3"] == [128, 8, 8]
    for bad in ("3,32", "a,b,c", "0,8,8"):
        r = cli("layers", "--input-shape", bad)
        assert r.code == 2 and r.err.startswith("error: --input-shape") and len(r.err.strip().splitlines()) == 1


def test_images_the_model_cannot_take(cli, tmp_path, resnet18_path):
    """Grey 8×8 digits for a CIFAR ResNet: one line naming both shapes, not a convolution traceback."""
    r = cli("rank", "--model", resnet18_path, "--arch", "resnet18", "--dataset", "digits",
            "--out", tmp_path / "i.safetensors", "--device", "cpu")
    assert r.code == 2 and r.err.strip() == "error: --dataset digits has 1-channel images but the model takes 3×32×32"


def test_input_shape_from_data_only_when_nothing_else_says(demo):
    """A model whose source does not fix its input shape reads it from the data set, and without one asks for
    --input-shape."""
    import dataclasses

    from igd_cli.common import model_input_shape

    unknown = dataclasses.replace(demo, input_shape=None, dataset=None)
    assert model_input_shape(unknown, None, "digits") == (1, 8, 8)
    assert model_input_shape(unknown, (1, 12, 12), "digits") == (1, 12, 12)
    assert model_input_shape(demo, None, None) == (1, 8, 8)
    with pytest.raises(IgdError, match="pass --input-shape C,H,W"):
        model_input_shape(unknown, None, None)
    for arch, spec in ARCHS.items():
        assert spec.input_shape is not None, arch


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
