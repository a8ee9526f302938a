"""Built-in architectures for state-dict files (``--arch``) and the embedded demo network.

The CIFAR networks are RobustBench's own definitions (the layout shared by RobustBench, AutoAttack and the
paper's code), so their checkpoints load unchanged; ``resnet50`` is torchvision's with ImageNet
normalisation folded in. Only the demo CNN is defined here, because no package ships a digits model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._compat import import_robustbench

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """``model((x - mean) / std)`` for inputs in [0, 1]; children are named ``normalize`` and ``model``
    like RobustBench's ``normalize_model``, so layer names read ``model.layer4``. ``persistent``: keep mean and
    std in the state dict, so the model fingerprint covers them (a ``--normalize`` given by the user)."""

    def __init__(self, model: nn.Module, mean, std, persistent: bool = False):
        super().__init__()
        self.normalize = _Normalize(mean, std, persistent)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


class _Normalize(nn.Module):
    def __init__(self, mean, std, persistent: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=persistent)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=persistent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class DemoCNN(nn.Module):
    """The embedded demo network for 8x8 grey digits: three conv blocks, global average pooling, linear.

    ``block3`` is the penultimate layer (128 channels), the layer IG-Defense masks by default.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        c1, c2, c3 = widths
        self.block1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3), nn.ReLU())
        self.linear = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(x)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@dataclass(frozen=True)
class Arch:
    """How to build an architecture, where its penultimate layer is and what input it takes.

    ``input_shape`` (C, H, W) lets commands that need only a shape (``igd layers``, the layer's N) run without data.
    """

    build: Callable[[int], nn.Module]
    default_layer: str
    description: str
    classifier_key: str  # state-dict key of the final linear weight, to infer the number of classes
    input_shape: tuple[int, int, int] | None = None  # (C, H, W) of one image, when the architecture fixes it


def _resnet18(num_classes: int) -> nn.Module:
    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def _preact_resnet18(num_classes: int) -> nn.Module:
    import_robustbench()
    from robustbench.model_zoo.architectures.resnet import PreActBlock, PreActResNet

    return PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes=num_classes)


def _wrn_34_10(num_classes: int) -> nn.Module:
    import_robustbench()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes)


def _resnet50(num_classes: int) -> nn.Module:
    import torchvision

    return Normalized(torchvision.models.resnet50(weights=None, num_classes=num_classes), IMAGENET_MEAN, IMAGENET_STD)


CIFAR_SHAPE = (3, 32, 32)
IMAGENET_SHAPE = (3, 224, 224)  # RobustBench's ImageNet preprocessing: resize 256, centre crop 224
DIGITS_SHAPE = (1, 8, 8)

#: ``--arch`` name -> architecture. The CIFAR ones come from RobustBench's architecture zoo.
ARCHS: dict[str, Arch] = {
    "resnet18": Arch(_resnet18, "layer4", "CIFAR ResNet-18 (RobustBench/AutoAttack layout)", "linear.weight",
                     input_shape=CIFAR_SHAPE),
    "preact-resnet18": Arch(_preact_resnet18, "layer4", "CIFAR PreAct ResNet-18 (RobustBench layout)",
                            "linear.weight", input_shape=CIFAR_SHAPE),
    "wrn-34-10": Arch(_wrn_34_10, "block3", "WideResNet-34-10 (TRADES/RobustBench layout)", "fc.weight",
                      input_shape=CIFAR_SHAPE),
    "resnet50": Arch(_resnet50, "model.layer4", "torchvision ResNet-50 with ImageNet normalisation", "fc.weight",
                     input_shape=IMAGENET_SHAPE),
    "demo-cnn": Arch(lambda n: DemoCNN(n), "block3", "the embedded digits CNN", "linear.weight",
                     input_shape=DIGITS_SHAPE),
}
