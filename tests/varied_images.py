"""Real-model test images whose predictions differ across the batch, so that per-image quantities (the pseudo-label
ŷ, the neuron weights s = m ŷ) differ too: a bug that mixes images of a batch (averaging the weights, broadcasting
one image's weights to all) then changes the output. Uniform noise does not do this: the real ResNet-18 assigns
it to one class, so every image gets the same weights."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn

from .conftest import SHARED_DATA

CIFAR_TEST = SHARED_DATA / "cifar10-test-846.safetensors"


def cifar_images(model: nn.Module, n: int) -> torch.Tensor:
    """``n`` CIFAR-shaped images in [0, 1] that ``model`` assigns to several classes: the first ``n`` of
    ``cifar10-test-846`` when ``../shared`` is there, else noise pushed towards class ``i % 10`` (see
    :func:`_steered`)."""
    if CIFAR_TEST.exists():
        from igd_cli.data import load_dataset

        return load_dataset(str(CIFAR_TEST), "test", n).all().x
    return _steered(model, n).clone()


@lru_cache(maxsize=2)
def _steered(model: nn.Module, n: int) -> torch.Tensor:
    """Uniform noise moved by signed-gradient steps of 2/255 towards the logit of class ``i % 10`` (a targeted
    FGSM-style walk, written here so the images do not depend on igd's attacks), each image only until the model
    predicts its class: just across the boundary, so the soft label at τ = 1 is far from one-hot."""
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.arange(n) % 10
    for _ in range(60):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        todo = logits.argmax(1) != target
        if not todo.any():
            break
        margin = logits.gather(1, target[:, None])[:, 0] - logits.logsumexp(1)
        (grad,) = torch.autograd.grad(margin.sum(), x)
        x = (x + 2 / 255 * grad.sign() * todo[:, None, None, None]).clamp(0, 1)
    return x.detach()


def n_classes_predicted(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return len(set(model(x).argmax(1).tolist()))
