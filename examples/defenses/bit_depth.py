"""Bit-depth reduction (Xu et al., NDSS 2018, "Feature squeezing"): each pixel rounded to ``bits`` bits before
the base model. The rounding has a zero gradient almost everywhere, so gradient attacks on the defended model
see nothing (gradient masking); ``surrogate`` is the same forward with the identity as the rounding's backward
(BPDA, Athalye et al., ICML 2018), which the adaptive attack follows.

    igd defend-eval --model demo --defense examples/defenses/bit_depth.py:bit_depth --attack iw-wc
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BitDepth(nn.Module):
    """``model(round(x · (2^bits − 1)) / (2^bits − 1))``: deterministic, gradient zero almost everywhere."""

    def __init__(self, model: nn.Module, bits: int = 3):
        super().__init__()
        self.model, self.bits = model, int(bits)

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2 ** self.bits - 1
        return torch.round(x * levels) / levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.squeeze(x))

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """The same logits; on the backward pass the rounding is the identity (BPDA)."""
        return self.model(x + (self.squeeze(x) - x).detach())

    def settings(self) -> dict:
        return {"bits": self.bits}


def bit_depth(base: nn.Module, bits: int = 3) -> nn.Module:
    """The defence igd builds from ``--defense examples/defenses/bit_depth.py:bit_depth``."""
    return BitDepth(base, bits)
