"""A small CNN for 28×28 MNIST digits: the README's example of bringing your own architecture to igd.

igd builds it from this file (``--arch examples/mnist_cnn.py:small_cnn``) and loads its weights from
``--model``; the network has no normalisation inside, so igd wraps it with ``--normalize mnist``.
``scripts/train_mnist_example.py`` trains it and runs the whole pipeline on it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """Three conv blocks (32 → 64 → 128 channels), global average pooling and a linear classifier; ``block3``
    (128 channels, 7×7) is the penultimate layer, ``block2`` (64 channels, 7×7) the one before."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                    nn.MaxPool2d(2))
        self.block3 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block3(self.block2(self.block1(x)))).flatten(1))


def small_cnn(num_classes: int = 10) -> nn.Module:
    """The callable ``--arch examples/mnist_cnn.py:small_cnn`` names (igd passes ``num_classes``)."""
    return SmallCNN(num_classes)
