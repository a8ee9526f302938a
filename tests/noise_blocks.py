"""Test helpers for querying a randomized model as igd does: inside an image block (:mod:`igd_cli.noise`)."""

from __future__ import annotations

import torch

from igd_cli import noise
from igd_cli.noise import FreshNoise


def block(x: torch.Tensor, seed: int = 0):
    """An image block for the rows of ``x`` (images 0..B-1 with their content) on a test stream of ``seed``."""
    return noise.images(noise.image_keys(None, x), noise.stream(seed, "test"))


def first_draws(seed: int, x: torch.Tensor, sigma: float, n_smooth: int = 1) -> torch.Tensor:
    """σ times the (n_s, *x.shape) standard normals the first query of the rows of ``x`` draws in
    ``block(x, seed)``: the noise a defence called there adds (the keying itself is tested in test_noise.py)."""
    with block(x, seed):
        return FreshNoise().sample(x, n_smooth) * sigma
