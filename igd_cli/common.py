"""Glue shared by the commands: open the model and data named by the options, parse ε, pick defaults."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from .data import ImageSet, load_dataset
from .devices import resolve_device
from .errors import IgdError
from .layers import layer_output_shape, resolve_layer
from .models import DEFAULT_EPS, LoadedModel, load_model


def parse_eps(text: str | float | None) -> float | None:
    """``8/255`` or ``0.0314`` -> float; None stays None."""
    if text is None or isinstance(text, float):
        return text
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise IgdError(f"--eps {text!r}: expected a number like 8/255 or 0.0314") from exc
    if not 0 < value <= 1:
        raise IgdError(f"--eps {text}: must be in (0, 1] for images in [0, 1]")
    return value


@dataclass
class Target:
    """A model, its device and the data set it is used with."""

    loaded: LoadedModel
    device: torch.device
    dataset: str

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def data(self, split: str, n: int | None, data_dir: Path | None = None) -> ImageSet:
        return load_dataset(self.dataset, split, n, data_dir)

    def default_eps(self) -> float:
        if self.loaded.eps is not None and (self.loaded.dataset in (None, self.dataset)):
            return self.loaded.eps
        if self.dataset in DEFAULT_EPS:
            return DEFAULT_EPS[self.dataset]
        raise IgdError(f"no default ε for data set {self.dataset}: pass --eps")

    def provenance(self) -> dict[str, Any]:
        return {"model": self.loaded.name, "model_fingerprint": self.loaded.fingerprint,
                "num_classes": self.loaded.num_classes, "dataset": self.dataset}


def open_target(model: str, arch: str | None, dataset: str | None, threat_model: str = "Linf",
                device: str = "auto", normalize: str | None = None) -> Target:
    dev = resolve_device(device)
    loaded = load_model(model, arch, dataset, threat_model, dev, normalize=normalize)
    ds = dataset or loaded.dataset
    if ds is None:
        raise IgdError(f"--model {model}: pass --dataset (the model does not say which data it was trained on)")
    return Target(loaded, dev, ds)


def resolve_model_layer(target: Target, layer: str | None, input_shape: tuple[int, ...]) -> tuple[str, int]:
    """The full layer name (default: the model's penultimate layer) and its neuron count N."""
    if layer is None:
        layer = target.loaded.default_layer
        if layer is None:
            raise IgdError("--layer is required for this model (igd layers --model ... lists them)")
    name = resolve_layer(target.model, layer)
    shape = layer_output_shape(target.model, name, input_shape)
    return name, shape[0]


def check_classes(target: Target, data: ImageSet) -> None:
    """The model's classes must match the data's."""
    if target.loaded.num_classes != data.num_classes:
        raise IgdError(f"--dataset {data.name} has {data.num_classes} classes but the model predicts "
                       f"{target.loaded.num_classes}")
