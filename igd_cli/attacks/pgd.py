"""PGD (Madry et al. 2018) and FGSM (Goodfellow et al. 2015), ℓ∞, on the cross-entropy loss.

Written here because they are a few lines and the packages that ship them (torchattacks, advertorch) are not
dependencies; the random start is drawn per image (see ``base``). PGD keeps, per image, the first iterate
that is misclassified, else the last one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import noise
from .base import Attack, image_generators


def _grad(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        g, = torch.autograd.grad(loss, [x])
    return g.detach(), logits.detach()


class PGD(Attack):
    """ℓ∞ PGD with a uniform random start, 20 steps of size 2.5·ε/steps."""

    name = "pgd"
    defaults = {"steps": 20, "restarts": 1}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        steps = self.budget["steps"]
        alpha = 2.5 * self.eps / steps
        gens = image_generators(self.seed, index)
        out = x.clone()
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.budget["restarts"]):
            todo = (~done).nonzero().flatten()
            if todo.numel() == 0:
                break
            x0, y0 = x[todo], y[todo]
            # CPU generators (the same draw on any device), moved to the images' device and dtype
            start = torch.stack([torch.rand(x.shape[1:], generator=gens[i]) for i in todo.tolist()]).to(x.device,
                                                                                                       x.dtype)
            xa = (x0 + (2 * start - 1) * self.eps).clamp(0, 1)
            found = torch.zeros(len(todo), dtype=torch.bool, device=x.device)
            best = xa.clone()
            with noise.rows(todo):
                for _ in range(steps):
                    g, logits = _grad(self.model, xa, y0)
                    wrong = (logits.argmax(1) != y0) & ~found
                    best[wrong], found[wrong] = xa[wrong], True
                    xa = torch.min(torch.max(xa + alpha * g.sign(), x0 - self.eps), x0 + self.eps).clamp(0, 1)
                with torch.no_grad():
                    wrong = (self.model(xa).argmax(1) != y0) & ~found
            best[wrong], found[wrong] = xa[wrong], True
            best[~found] = xa[~found]
            out[todo] = best
            done[todo[found]] = True
        return out


class FGSM(Attack):
    """One signed-gradient step of size ε from the clean image."""

    name = "fgsm"
    defaults: dict[str, int] = {}

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        g, _ = _grad(self.model, x, y)
        return (x + self.eps * g.sign()).clamp(0, 1)
