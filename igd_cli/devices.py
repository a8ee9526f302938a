"""Device selection (``auto`` means CUDA when available, else CPU) and the device a model lives on."""

from __future__ import annotations

import torch

from .errors import IgdError


def resolve_device(spec: str = "auto") -> torch.device:
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise IgdError(f"--device {spec}: no CUDA device is available on this machine (use --device cpu)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IgdError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if spec == "cpu":
        return torch.device("cpu")
    raise IgdError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def module_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype of a model's first floating parameter (or buffer): what a probe input is made in (float32
    for a model with neither, igd's image dtype)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32
