"""The default masked layer of your own architecture (issue 24.6): where one module feeds the classifier channel by
channel (only ReLU, pooling and flattening in between, which commute with a non-negative channel scale), it is the
default, and igd layers and igd rank say so; otherwise --layer stays required, in one error line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from igd_cli.artifacts import load_artifact
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.layers import feeding_layer

from .noise_blocks import block

ROOT = Path(__file__).resolve().parents[1]

ARCHS = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Renamed(nn.Module):
        """No layer4 / block3: a conv block (conv, BN), a ReLU module, pooling, a functional flatten, a classifier.
        The layer a person masks: ``body``, the block feeding the classifier before ReLU and pooling."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16))
            self.act = nn.ReLU()
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.gap(self.act(self.body(self.stem(x)))), 1))


    class Squashed(Renamed):
        """A tanh between the features and the classifier: no channel scale passes it, so no module feeds the
        classifier channel by channel (a rule by module types alone would still pick ``body``)."""

        def forward(self, x):
            return self.classifier(torch.tanh(torch.flatten(self.gap(self.act(self.body(self.stem(x)))), 1)))


    class Flat(nn.Module):
        """The classifier reads a flattened 4x8x8 map: no module outputs its 256 inputs as channels."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.classifier = nn.Linear(256, num_classes)

        def forward(self, x):
            return self.classifier(self.conv(x).flatten(1))
''')


def _module(tmp_path):
    import importlib.util

    path = tmp_path / "archs.py"
    path.write_text(ARCHS)
    spec = importlib.util.spec_from_file_location("archs_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return path, mod


def _net(mod, cls: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = getattr(mod, cls)(10).eval()
    for m in net.modules():  # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net


def _weights(tmp_path, mod, cls: str) -> Path:
    path = tmp_path / f"{cls}.safetensors"
    save_file({k: v.contiguous() for k, v in _net(mod, cls).state_dict().items()}, str(path))
    return path


def test_the_rule_finds_the_block_a_person_picks(tmp_path, demo, resnet18):
    _, mod = _module(tmp_path)
    name, why = feeding_layer(_net(mod, "Renamed"), (1, 8, 8))
    assert name == "body" and "classifier" in why and "16 channels" in why
    # where the architecture names its layer, the rule agrees with it
    assert feeding_layer(demo.model, (1, 8, 8))[0] == demo.default_layer == "block3"
    assert feeding_layer(resnet18.model, (3, 32, 32))[0] == resnet18.default_layer == "layer4"
    import importlib.util

    spec = importlib.util.spec_from_file_location("mnist_cnn_ref", ROOT / "examples" / "mnist_cnn.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    assert feeding_layer(ex.small_cnn(10).eval(), (1, 28, 28))[0] == "block3"


@pytest.mark.parametrize("cls, why", [("Squashed", "channel by channel"), ("Flat", "256 channels")])
def test_no_default_where_no_module_feeds_the_classifier(tmp_path, cls, why):
    _, mod = _module(tmp_path)
    name, reason = feeding_layer(_net(mod, cls), (1, 8, 8))
    assert name is None and why in reason


def test_no_default_without_a_linear_classifier():
    net = nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    assert feeding_layer(net, (1, 8, 8)) == (None, "no nn.Linear classifier produces the model's output")


@pytest.mark.parametrize("rs", [False, True])
def test_masking_the_default_is_masking_after_relu_and_pooling(tmp_path, rs):
    """The layers the rule passes over (the ReLU module, the pooling) give the same defence: the mask is a
    non-negative channel scale, and ReLU and pooling commute with it."""
    _, mod = _module(tmp_path)
    net = _net(mod, "Renamed")
    g = torch.Generator().manual_seed(1)
    mask = topk_mask(torch.rand(16, 10, generator=g), 5)
    x = torch.rand(12, 1, 8, 8, generator=g)
    def defended(layer):  # every defence's first query of these images: the same noise draws
        with block(x):
            return IGDefense(net, layer, mask, sigma=0.1, rs=rs, seed=3)(x)

    out = {layer: defended(layer) for layer in ("body", "act", "gap")}
    torch.testing.assert_close(out["act"], out["body"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["gap"], out["body"], rtol=1e-5, atol=1e-5)
    # and not the same as masking before the BN (the rule rejects body.0 for this)
    assert not torch.allclose(defended("body.0"), out["body"], atol=1e-3)


def test_layers_and_rank_use_and_state_the_default(tmp_path, cli, igd_home):
    path, mod = _module(tmp_path)
    model = ["--model", _weights(tmp_path, mod, "Renamed"), "--arch", f"{path}:Renamed", "--dataset", "digits",
             "--device", "cpu"]
    r = cli("layers", *model, "--json")
    assert r.code == 0, r.err
    assert r.json()["default_layer"] == "body" and "classifier" in r.json()["default_layer_chosen_by"]
    r = cli("layers", *model)
    assert "default masked layer: body, the module feeding the classifier classifier" in " ".join(r.out.split())
    imp = tmp_path / "imp.safetensors"
    r = cli("rank", *model, "--n-probe", 30, "--out", imp, "--json")
    assert r.code == 0, r.err
    assert r.json()["layer"] == "body" and r.json()["shape"] == [16, 10]
    assert "classifier" in r.json()["layer_chosen_by"]
    art = load_artifact(imp, kind="importance")
    assert art.meta["layer"] == "body" and "classifier" in art.meta["layer_chosen_by"]
    named = tmp_path / "named.safetensors"
    r = cli("rank", *model, "--n-probe", 30, "--layer", "body", "--out", named, "--json")
    assert r.code == 0 and "layer_chosen_by" not in r.json()
    torch.testing.assert_close(load_artifact(named)["importance"], art["importance"], rtol=0, atol=0)
    # the same ranking, so the rerun with the default reuses the named file
    r = cli("rank", *model, "--n-probe", 30, "--out", named, "--json")
    assert r.code == 0 and r.json()["skipped"]


@pytest.mark.parametrize("cls", ["Squashed", "Flat"])
def test_without_a_feeding_module_layer_stays_required(tmp_path, cli, igd_home, cls):
    path, mod = _module(tmp_path)
    model = ["--model", _weights(tmp_path, mod, cls), "--arch", f"{path}:{cls}", "--dataset", "digits",
             "--device", "cpu"]
    r = cli("rank", *model, "--n-probe", 30, "--out", tmp_path / "imp.safetensors")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1
    assert r.err.startswith("error: --layer is required for this model: ") and "igd layers" in r.err
    r = cli("layers", *model, "--json")
    assert r.code == 0 and r.json()["default_layer"] is None and r.json()["no_default_layer_because"]


def test_the_pipeline_masks_the_default_and_records_why(tmp_path, cli, igd_home):
    path, mod = _module(tmp_path)
    model = ["--model", _weights(tmp_path, mod, "Renamed"), "--arch", f"{path}:Renamed", "--dataset", "digits",
             "--device", "cpu"]
    r = cli("pipeline", *model, "--attack", "aa", "--eps", "0.1", "--n-probe", 30, "--n-examples", 8, "--steps", 2,
            "--queries", 20, "--eot-iter", 1, "--restarts", 1, "--out", tmp_path / "run", "--json")
    assert r.code == 0, r.err
    assert r.json()["layer"] == "body"
    art = load_artifact(tmp_path / "run" / "importance-lo-ir-body.safetensors", kind="importance")
    assert "classifier" in art.meta["layer_chosen_by"]
