"""Randomized input transformation (Xie et al., ICLR 2018, "Mitigating adversarial effects through
randomization"): each image resized to a random size ``r`` in [S, S + extra] (extra: about 10.7 % of S, as
299 -> 331 in the paper), zero-padded at a random place to
S + extra, and resized back to the model's S. Fresh randomness at every forward (``randomized = True``): igd
scores it by repeated draws and attacks it with EoT (Athalye et al., ICML 2018). The draws come from
``igd_cli.noise.uniform_like``: inside igd's evaluation a function of the image and the query, so every result
is the same in any batch, shard or order; outside it, ``torch.rand``.

    igd defend-eval --model demo --defense examples/defenses/random_resize.py:random_resize --attack iw-wc
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from igd_cli import noise


class RandomResizePad(nn.Module):
    """Random resize and pad, per image, then back to the input size (differentiable in the image)."""

    randomized = True

    def __init__(self, model: nn.Module, extra: int | None = None):
        super().__init__()
        self.model, self.extra = model, extra

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        extra = self.extra if self.extra is not None else max(1, round(0.107 * s))  # Xie: 299 -> 331
        u = noise.uniform_like(x.new_empty(len(x), 3))  # per image: size, left, top
        out = []
        for i in range(len(x)):
            r = s + min(int(u[i, 0] * (extra + 1)), extra)
            left = min(int(u[i, 1] * (s + extra - r + 1)), s + extra - r)
            top = min(int(u[i, 2] * (s + extra - r + 1)), s + extra - r)
            xi = F.interpolate(x[i:i + 1], size=(r, r), mode="bilinear", align_corners=False)
            xi = F.pad(xi, (left, s + extra - r - left, top, s + extra - r - top))
            out.append(F.interpolate(xi, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(x))

    def settings(self) -> dict:
        return {"extra": self.extra}


def random_resize(base: nn.Module, extra: int | None = None) -> nn.Module:
    """The defence igd builds from ``--defense examples/defenses/random_resize.py:random_resize``."""
    return RandomResizePad(base, extra)
