"""Square Attack (Andriushchenko et al., ECCV 2020) with per-image randomness: pyautoattack's ``SquareAttack``,
image by image, in one batch.

Why not pyautoattack's ``SquareAttack`` on the batch: it draws one window position and one sign pattern per
iteration from the global generator and applies them to every image of the batch, so an image's point depends on
the other images in its batch (its size, a shard split, the survivors IW-WC skips to). Here every image draws from
its own generator, seeded with :func:`~igd_cli.attacks.base.image_seed`, in the order pyautoattack draws them for a
batch of one: an image gets exactly the point ``SquareAttack(seed=image_seed(seed, index)).perturb`` gives it alone
(tested image by image), whatever batch it is in. The loss, the schedule of p, the window updates and the
restarts are pyautoattack's (``margin_and_loss``, ``p_selection``, ``eta``, ``normalize`` and ``lp_norm`` are its own
methods); only the random draws and the per-image windows are written here. ℓ∞ and ℓ2, untargeted (AutoAttack's
use: margin loss, ``p_init`` 0.8, no rescaled schedule).
"""

from __future__ import annotations

import math

import torch
from pyautoattack.square import SquareAttack

from .. import noise
from .base import DrawsPick, image_generators


class PerImageSquare(SquareAttack):
    """``SquareAttack`` whose random draws come from one generator per image (``perturb(x, y, index)``).

    Example::

        sq = PerImageSquare(model, n_queries=5000, eps=8 / 255, norm="Linf", seed=0, p_init=0.8,
                            resc_schedule=False)
        x_adv = sq.perturb_images(x, y, index)  # index: the images' positions in the split
    """

    # -- the per-image draws, in the order SquareAttack makes them for a batch of one ------------------------
    @staticmethod
    def _rand(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.rand(shape, generator=g) for g in gens])

    def _choice(self, gens: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
        """``random_choice(shape)`` per image: (B, *shape) signs."""
        return torch.sign(2 * self._rand(gens, shape) - 1).to(device)

    def _int(self, gens: list[torch.Generator], low: int, high: int, device) -> torch.Tensor:
        """``random_int(low, high)`` per image: (B,) int64 (the same float32 arithmetic as pyautoattack)."""
        t = low + (high - low) * self._rand(gens, (1,))
        return t.long().flatten().to(device)

    def _eta(self, gens: list[torch.Generator], s: int, device) -> torch.Tensor:
        """``eta(s)`` per image (ℓ2): the window profile, transposed where the image's draw says so: (B, s, s)."""
        base = self.eta_no_flip(s)
        flip = self._rand(gens, (1,)).flatten() > 0.5
        out = base.unsqueeze(0).repeat(len(gens), 1, 1)
        out[flip] = base.t()
        return out.to(device)

    def eta_no_flip(self, s: int) -> torch.Tensor:
        """pyautoattack's ``eta(s)`` before its random transposition (its first lines, for the ℓ2 norm)."""
        delta = torch.zeros([s, s], device=self.device)
        delta[:s // 2] = self.eta_rectangles(s // 2, s)
        delta[s // 2:] = -1. * self.eta_rectangles(s - s // 2, s)
        delta /= (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()
        return delta

    # -- the attack ----------------------------------------------------------------------------------------
    def perturb_images(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, draws: int = 1) -> torch.Tensor:
        """``SquareAttack.perturb(x, y)`` (untargeted), each image with its own generator. ``draws`` > 1 (a
        randomized model, where "fooled" in one query is a coin toss): every restart on every image, each image
        keeping the restart's point wrong in the most of ``draws`` fresh classifications."""
        self.init_hyperparam(x)
        adv = x.clone()
        y = y.detach().clone().long().to(self.device)
        gens = image_generators(self.seed, index)
        if draws > 1:
            pick = DrawsPick(self.predict, y, draws)
            for _ in range(self.n_restarts):
                pick.offer(self._single_run(x.clone(), y.clone(), gens))
            return pick.points
        with torch.no_grad():
            acc = self.predict(x).max(1)[1] == y
        for _ in range(self.n_restarts):
            todo = acc.nonzero().flatten()
            if todo.numel() == 0:
                break
            with noise.rows(todo):
                adv_curr = self._single_run(x[todo].clone(), y[todo].clone(), [gens[i] for i in todo.tolist()])
                with torch.no_grad():
                    acc_curr = self.predict(adv_curr).max(1)[1] == y[todo]
            won = (~acc_curr).nonzero().flatten()
            acc[todo[won]] = False
            adv[todo[won]] = adv_curr[won].clone()
        return adv

    @torch.no_grad()
    def _single_run(self, x: torch.Tensor, y: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """``attack_single_run`` with per-image windows and signs (ℓ∞ and ℓ2)."""
        if self.norm not in ("Linf", "L2"):
            raise ValueError(f"Square: norm {self.norm} is not supported here")
        dev = x.device
        c, h, w = x.shape[1:]
        n_features = c * h * w
        if self.norm == "Linf":
            x_best = torch.clamp(x + self.eps * self._choice(gens, (c, 1, w), dev), 0., 1.)
        else:
            delta_init = torch.zeros_like(x)
            s = h // 5
            sp_init = (h - s * 5) // 2
            vh = sp_init
            for _ in range(h // s):
                vw = sp_init
                for _ in range(w // s):
                    eta = self._eta(gens, s, dev)  # (B, s, s)
                    delta_init[:, :, vh:vh + s, vw:vw + s] += eta.unsqueeze(1) * self._choice(gens, (c, 1, 1), dev)
                    vw += s
                vh += s
            x_best = torch.clamp(x + self.normalize(delta_init) * self.eps, 0., 1.)
        margin_min, loss_min = self.margin_and_loss(x_best, y)
        if (margin_min < 0.0).all():
            return x_best
        for i_iter in range(self.n_queries):
            idx = (margin_min > 0.0).nonzero().flatten()
            if idx.numel() == 0:
                break
            g_act = [gens[i] for i in idx.tolist()]
            x_curr, x_best_curr, y_curr = x[idx], x_best[idx], y[idx]
            p = self.p_selection(i_iter)
            if self.norm == "Linf":
                s = max(int(round(math.sqrt(p * n_features / c))), 1)
                s = min(s, min(h, w))
                vh, vw = self._int(g_act, 0, h - s, dev), self._int(g_act, 0, w - s, dev)
                signs = 2. * self.eps * self._choice(g_act, (c, 1, 1), dev)  # (B', c, 1, 1)
                new_deltas = torch.zeros_like(x_curr)
                _set_window(new_deltas, vh, vw, s, signs.expand(-1, -1, s, s))
                x_new = torch.min(torch.max(x_best_curr + new_deltas, x_curr - self.eps), x_curr + self.eps)
                x_new = torch.clamp(x_new, 0., 1.)
            else:
                delta_curr = x_best_curr - x_curr
                s = max(int(round(math.sqrt(p * n_features / c))), 3)
                if s % 2 == 0:
                    s += 1
                s = min(s, min(h, w))
                vh, vw = self._int(g_act, 0, h - s, dev), self._int(g_act, 0, w - s, dev)
                vh2, vw2 = self._int(g_act, 0, h - s, dev), self._int(g_act, 0, w - s, dev)
                mask_1 = torch.zeros_like(x_curr)
                _set_window(mask_1, vh, vw, s, torch.ones(len(idx), c, s, s, dtype=x.dtype, device=dev))
                norms_window_1 = (_get_window(delta_curr, vh, vw, s) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
                mask_2 = torch.zeros_like(x_curr)
                _set_window(mask_2, vh2, vw2, s, torch.ones(len(idx), c, s, s, dtype=x.dtype, device=dev))
                norms_image = self.lp_norm(x_best_curr - x_curr)
                mask_image = torch.max(mask_1, mask_2)
                norms_windows = ((delta_curr * mask_image) ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()
                new_deltas = torch.ones([len(idx), c, s, s], dtype=x.dtype, device=dev)
                new_deltas *= self._eta(g_act, s, dev).unsqueeze(1) * self._choice(g_act, (c, 1, 1), dev)
                old_deltas = _get_window(delta_curr, vh, vw, s) / (1e-12 + norms_window_1)
                new_deltas += old_deltas
                new_deltas = new_deltas / (1e-12 + (new_deltas ** 2).sum(dim=(-2, -1), keepdim=True).sqrt()) * (
                    torch.max((self.eps * torch.ones_like(new_deltas)) ** 2 - norms_image ** 2,
                              torch.zeros_like(new_deltas)) / c + norms_windows ** 2).sqrt()
                _set_window(delta_curr, vh2, vw2, s, torch.zeros(len(idx), c, s, s, dtype=x.dtype, device=dev))
                _set_window(delta_curr, vh, vw, s, new_deltas + 0)
                x_new = torch.clamp(x_curr + self.normalize(delta_curr) * self.eps, 0., 1.)
            with noise.rows(idx):
                margin, loss = self.margin_and_loss(x_new, y_curr)
            margin_min_curr, loss_min_curr = margin_min[idx], loss_min[idx]
            improved = (loss < loss_min_curr).float()
            loss_min[idx] = improved * loss + (1. - improved) * loss_min_curr
            improved = torch.max(improved, (margin <= 0.).float())
            margin_min[idx] = improved * margin + (1. - improved) * margin_min_curr
            improved = improved.reshape([-1, *[1] * (x.dim() - 1)])
            x_best[idx] = improved * x_new + (1. - improved) * x_best_curr
        return x_best


def _rows_cols(t: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor, s: int):
    ar = torch.arange(s, device=t.device)
    b = torch.arange(t.shape[0], device=t.device)[:, None, None]
    return b, (vh[:, None] + ar)[:, :, None], (vw[:, None] + ar)[:, None, :]


def _get_window(t: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor, s: int) -> torch.Tensor:
    """``t[i, :, vh_i:vh_i+s, vw_i:vw_i+s]`` for every image i: (B, C, s, s)."""
    b, r, c = _rows_cols(t, vh, vw, s)
    return t[b, :, r, c].permute(0, 3, 1, 2)


def _set_window(t: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor, s: int, values: torch.Tensor) -> None:
    """``t[i, :, vh_i:vh_i+s, vw_i:vw_i+s] = values[i]`` for every image i (values: (B, C, s, s))."""
    b, r, c = _rows_cols(t, vh, vw, s)
    t[b, :, r, c] = values.permute(0, 2, 3, 1).to(t.dtype)
