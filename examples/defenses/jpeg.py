"""A JPEG-like compression of the input (Guo et al., ICLR 2018, "Countering adversarial images using input
transformations"): 8×8 block DCT, coefficients quantized by the JPEG luminance table at ``quality``, inverse DCT.
Computed without autograd, as a real codec (PIL, libjpeg) would be: the defended model's output has no gradient
at all, so igd's gradient attacks report that they cannot run. ``surrogate`` is the same forward with the
identity as the compression's backward (BPDA, Athalye et al., ICML 2018), which the adaptive attack follows.

    igd defend-eval --model demo --defense examples/defenses/jpeg.py:jpeg --attack iw-wc
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the JPEG standard's luminance quantization table (quality 50, for pixel values 0..255)
LUMINANCE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float64)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    """The orthonormal DCT-II matrix: ``D @ block @ D.T`` are a block's coefficients."""
    k = torch.arange(n, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def _table(quality: int) -> torch.Tensor:
    """The luminance table scaled to ``quality`` (libjpeg's rule), for pixels in [0, 1]."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.clamp(torch.floor((LUMINANCE * scale + 50) / 100), min=1) / 255


class JpegLike(nn.Module):
    """``model(jpeg(x))`` with ``jpeg`` computed outside autograd (no gradient to the input)."""

    def __init__(self, model: nn.Module, quality: int = 75):
        super().__init__()
        if not 1 <= quality <= 100:
            raise ValueError(f"quality {quality}: expected 1..100")
        self.model, self.quality = model, int(quality)
        self.register_buffer("dct", _dct_matrix(), persistent=False)
        self.register_buffer("table", _table(self.quality), persistent=False)

    @torch.no_grad()
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ph, pw = -h % 8, -w % 8
        z = F.pad(x.double(), (0, pw, 0, ph), mode="replicate") - 0.5
        blocks = z.reshape(b, c, (h + ph) // 8, 8, (w + pw) // 8, 8).transpose(3, 4)  # (b, c, H/8, W/8, 8, 8)
        d = self.dct.to(x.device)
        q = self.table.to(x.device)
        coef = torch.round(d @ blocks @ d.T / q) * q
        out = (d.T @ coef @ d).transpose(3, 4).reshape(b, c, h + ph, w + pw)[:, :, :h, :w] + 0.5
        return out.clamp(0, 1).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.compress(x))

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """The same logits; on the backward pass the compression is the identity (BPDA)."""
        return self.model(x + (self.compress(x) - x).detach())

    def settings(self) -> dict:
        return {"quality": self.quality}


def jpeg(base: nn.Module, quality: int = 75) -> nn.Module:
    """The defence igd builds from ``--defense examples/defenses/jpeg.py:jpeg``."""
    return JpegLike(base, quality)
