"""Variants of the defended model that audits and analyses compare it with: the base model with the defence's
smoothing noise and no mask (the paper's Table 6, "one pass with smoothing"), and the defence with its noise
frozen to one draw (Croce et al., ICML 2022: a gain that exists only with fresh noise comes from randomness,
not from the masking).

Example::

    smooth = SmoothedModel(target.model, sigma=defense.sigma)   # randomized, scored by repeated draws
    fixed = frozen_noise(defense)                               # deterministic and differentiable
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .noise import FreshNoise


class SmoothedModel(nn.Module):
    """``f(x + v)``, one forward pass, ``v ~ N(0, σ²I)`` keyed as IG-Defense's first pass draws it
    (:mod:`igd_cli.noise`): randomized smoothing alone, without the mask."""

    def __init__(self, model: nn.Module, sigma: float, seed: int = 0):
        super().__init__()
        self.model, self.sigma = model, float(sigma)
        self._noise = FreshNoise(seed)

    @property
    def randomized(self) -> bool:
        return self.sigma > 0

    def reseed(self, seed: int | None = None) -> None:
        self._noise.restart(seed)

    def skip_noise(self, x: torch.Tensor, queries: int) -> None:
        self._noise.skip(x, queries)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + self.sigma * self._noise.sample(x, 1)[0])


def frozen_noise(defense: nn.Module, seed: int | None = None) -> nn.Module:
    """A copy of ``defense`` (sharing its model and mask) whose smoothing noise is one fixed draw for every image
    and query (:meth:`IGDefense.frozen`): deterministic, so it is scored once and attacked without EoT."""
    return defense.frozen(seed)
