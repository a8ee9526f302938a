"""PGD (Madry et al. 2018) and FGSM (Goodfellow et al. 2015), ℓ∞, on the cross-entropy loss.

Written here because they are a few lines and the packages that ship them (torchattacks, advertorch) are not
dependencies; the random start is drawn per image (see ``base``). On a deterministic model PGD keeps, per image,
the first iterate that is misclassified, else the last one. On a randomized model every gradient is the mean of
``eot_iter`` samples (EoT), and no decision rests on one draw: each restart's last iterate is kept, and between
restarts the point wrong in the most of ``GATE_DRAWS`` fresh classifications.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import noise
from .base import GATE_DRAWS, Attack, DrawsPick, image_generators


def _grad(model, x: torch.Tensor, y: torch.Tensor, samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy gradient at ``x`` (the mean over ``samples`` queries: EoT) and the last query's logits."""
    g = torch.zeros_like(x)
    for _ in range(samples):
        xr = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(xr)
            loss = F.cross_entropy(logits, y, reduction="sum")
            grad, = torch.autograd.grad(loss, [xr])
        g += grad.detach()
    return g / samples, logits.detach()


class PGD(Attack):
    """ℓ∞ PGD with a uniform random start, 20 steps of size 2.5·ε/steps (EoT with 20 samples on a randomized
    model)."""

    name = "pgd"
    defaults = {"steps": 20, "restarts": 1, "eot_iter": 20}
    revision = 2  # 1: no EoT on a randomized model, and its iterate chosen by one noise draw

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        steps = self.budget["steps"]
        alpha = 2.5 * self.eps / steps
        gens = image_generators(self.seed, index)
        out = x.clone()
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        pick = DrawsPick(self.model, y, GATE_DRAWS) if self.randomized else None
        samples = self.budget["eot_iter"] if self.randomized else 1
        for _ in range(self.budget["restarts"]):
            todo = (~done).nonzero().flatten() if pick is None else torch.arange(len(x), device=x.device)
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
                    g, logits = _grad(self.model, xa, y0, samples)
                    if pick is None:
                        wrong = (logits.argmax(1) != y0) & ~found
                        best[wrong], found[wrong] = xa[wrong], True
                    xa = torch.min(torch.max(xa + alpha * g.sign(), x0 - self.eps), x0 + self.eps).clamp(0, 1)
                if pick is not None:
                    pick.offer(xa)
                    continue
                with torch.no_grad():
                    wrong = (self.model(xa).argmax(1) != y0) & ~found
            best[wrong], found[wrong] = xa[wrong], True
            best[~found] = xa[~found]
            out[todo] = best
            done[todo[found]] = True
        return out if pick is None else pick.points


class FGSM(Attack):
    """One signed-gradient step of size ε from the clean image (the gradient the mean of 20 samples on a
    randomized model)."""

    name = "fgsm"
    defaults = {"eot_iter": 20}
    revision = 2  # 1: no EoT on a randomized model

    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        g, _ = _grad(self.model, x, y, self.budget["eot_iter"] if self.randomized else 1)
        return (x + self.eps * g.sign()).clamp(0, 1)
