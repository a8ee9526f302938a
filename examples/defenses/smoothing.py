"""Gaussian input noise alone (randomized smoothing with one sample, Cohen et al., ICML 2019; IG-Defense's
"smoothing alone" row): ``model(x + σ·v)``, ``v`` fresh standard normals at every forward. Randomized: igd scores
it by repeated draws and attacks it with EoT. The draws come from ``igd_cli.noise.normal_like``: inside igd's
evaluation a function of the image and the query (the same draws IG-Defense's first pass makes with one sample),
so every result is the same in any batch, shard or order; outside it, ``torch.randn_like``.

    igd defend-eval --model demo --defense examples/defenses/smoothing.py:smoothing --attack iw-wc
"""

from __future__ import annotations

import torch
import torch.nn as nn

from igd_cli import noise


class GaussianNoise(nn.Module):
    """``model(x + sigma · v)``, ``v ~ N(0, I)`` fresh at every forward."""

    randomized = True

    def __init__(self, model: nn.Module, sigma: float = 0.25):
        super().__init__()
        self.model, self.sigma = model, float(sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * noise.normal_like(x))

    def settings(self) -> dict:
        return {"sigma": self.sigma}


def smoothing(base: nn.Module, sigma: float = 0.25) -> nn.Module:
    """The defence igd builds from ``--defense examples/defenses/smoothing.py:smoothing``."""
    return GaussianNoise(base, sigma)


def smoothing_mnist(base: nn.Module) -> nn.Module:
    """σ = ε = 0.1, for the MNIST example (``examples/mnist_cnn.py``, ε = 0.1), whose clean digits σ = 0.25 leaves
    near chance: ``--defense examples/defenses/smoothing.py:smoothing_mnist``. A setting is a callable of its own,
    as the contract builds ``NAME(base_model)``."""
    return GaussianNoise(base, 0.1)
