"""RayS: hard-label (decision-based) ℓ∞ attack by ray searching (Chen & Gu, KDD 2020).

No package ships RayS, so it is written here after the paper's Algorithm 1–3 and the authors' reference code
(github.com/uclaml/RayS): the direction is a sign vector ``s`` in {−1, +1}^d, starting at all +1; at block
level ``l`` the input is cut into ``2^l`` blocks and each block in turn has its signs flipped; a flip is kept
when the decision boundary along the new direction is closer. The boundary radius along ``s/||s||₂`` is found
by a binary search that first checks, with one query, that the candidate is adversarial at the current best
radius (the paper's ray-search pruning), then bisects to a tolerance of 1e-3. Every evaluated point is
``clip(x + d·s/||s||₂, 0, 1)``; the attack stops for an image once its ℓ∞ distance is ≤ ε (early stopping)
or its queries reach the budget.

Differences from the reference code, all on the output side: the queries are counted per image and an image
stops being queried at success; a failed image returns the best direction's point projected onto the ε-ball
(the reference returns it outside the ball), so every returned point lies in the ε-ball and [0, 1]. The
search has no randomness: an image's result does not depend on its batch. Every query declares the images it is
made for (:func:`igd_cli.noise.rows`), so a randomized defence draws each attacked image's own noise for it (its
draws depend only on the attacked image, the query's ordinal and the seed, not on the batch — also for its first
queries, the box corner ``clip(x + ∞·s)``, which is the same point for every image of a batch).
"""

from __future__ import annotations

import math

import torch

from .. import noise
from .base import Attack


class RayS(Attack):
    """RayS, 10,000 queries per image (the paper's and the RayS authors' setting)."""

    name = "rays"
    defaults = {"queries": 10000}
    norms = ("Linf",)
    tol = 1e-3
    gradient = False

    @torch.no_grad()
    def _succ(self, x_q: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Which queries ``x_q`` (made for the images ``rows`` of the batch) are misclassified."""
        with noise.rows(rows):
            return self.model(x_q).argmax(1) != y

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        x_adv, _, _ = self.search(x, y)
        return x_adv

    @torch.no_grad()
    def search(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (points inside the ε-ball, ℓ∞ boundary distance found per image, queries used per image)."""
        limit = self.budget["queries"]
        n = len(x)
        shape = x.shape
        dim = int(math.prod(shape[1:]))
        xf = x.reshape(n, dim)
        sgn = torch.ones(n, dim, dtype=x.dtype, device=x.device)
        d_t = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        x_final = _point(xf, sgn / math.sqrt(dim), d_t)
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        dist = (x_final - xf).abs().amax(1)

        block_level, block_ind = 0, 0
        while True:
            active = (queries < limit) & (dist > self.eps)
            if not bool(active.any()):
                break
            block_num = 2 ** block_level
            block_size = int(math.ceil(dim / block_num))
            start, end = block_ind * block_size, min(dim, (block_ind + 1) * block_size)

            idx = active.nonzero().flatten()
            attempt = sgn[idx].clone()
            attempt[:, start:end] *= -1.0
            self._binary_search(xf[idx], y[idx], attempt, idx, d_t, sgn, x_final, queries, shape)

            block_ind += 1
            if block_ind == 2 ** block_level or end == dim:
                block_level += 1
                block_ind = 0
            dist = (x_final - xf).abs().amax(1)

        out = x_final.clone()
        failed = dist > self.eps
        if bool(failed.any()):  # the best direction's point, brought back into the ε-ball
            out[failed] = (xf[failed] + (x_final[failed] - xf[failed]).clamp(-self.eps, self.eps)).clamp(0, 1)
        return out.reshape(shape), dist, queries

    def _binary_search(self, x, y, attempt, idx, d_t, sgn, x_final, queries, shape) -> None:
        """Boundary radius along ``attempt``; updates the best direction/radius/point of improved images."""
        norm = attempt.norm(dim=1)
        unit = attempt / norm[:, None]
        d_cur = d_t[idx]
        d_start = torch.zeros_like(d_cur)
        d_end = d_cur.clone()

        queries[idx] += 1
        succ = self._succ(_point(x, unit, d_cur).reshape(-1, *shape[1:]), y, idx)
        d_end[succ] = torch.minimum(d_cur, norm)[succ]
        search = succ.nonzero().flatten()
        while search.numel() > 0:
            d_mid = (d_start[search] + d_end[search]) / 2.0
            queries[idx[search]] += 1
            s = self._succ(_point(x[search], unit[search], d_mid).reshape(-1, *shape[1:]), y[search],
                           idx[search])
            d_end[search[s]] = d_mid[s]
            d_start[search[~s]] = d_mid[~s]
            search = search[(d_end[search] - d_start[search]) > self.tol]

        better = (d_end < d_cur).nonzero().flatten()
        if better.numel() > 0:
            g = idx[better]
            d_t[g] = d_end[better]
            x_final[g] = _point(x[better], unit[better], d_end[better])
            sgn[g] = attempt[better]


def _point(x: torch.Tensor, unit: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``clip(x + d·unit, 0, 1)`` for flat images; an infinite ``d`` gives the corner of the box."""
    return torch.clamp(x + d[:, None] * unit, 0.0, 1.0)
