"""``--precision``: run ranking and the defended forward under ``torch.autocast`` (fp32 = no autocast).

Attacks always run in fp32: low precision can mask gradients (rounded logits flatten the loss surface and an
attack that sees zero or noisy gradients reports a robustness that is not there), so ``--precision`` never
reaches an attack or the scoring of an attack's set. A precision other than fp32 can change numbers, so it is part
of the identity of what it computes (:func:`precision_meta`), and fp32 leaves every identity as it was.

Example::

    with autocast("bf16", torch.device("cpu")):
        logits = model(x)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Literal, get_args

import torch

from .errors import IgdError

#: the ``--precision`` vocabulary
PrecisionName = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
#: autocast dtype of each precision (None: no autocast)
DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what --help and the docs say about attacks
ATTACKS_NOTE = "attacks always run in fp32 (low precision can mask gradients)"


def check_precision(precision: str, device: torch.device | str | None = None) -> str:
    """The precision name, checked: one of :data:`PRECISIONS`, and (given a device) one that ``torch.autocast``
    runs on that device type, else one ``IgdError`` line. Returns the name."""
    if precision not in DTYPES:
        raise IgdError(f"--precision {precision}: expected {', '.join(PRECISIONS)}")
    dtype = DTYPES[precision]
    if dtype is None or device is None:
        return precision
    dev = torch.device(device)
    probe = torch.ones(2, 2, device=dev)
    try:
        with warnings.catch_warnings():  # torch warns and disables autocast for an unsupported dtype
            warnings.simplefilter("error")
            with torch.autocast(dev.type, dtype=dtype):
                got = torch.mm(probe, probe).dtype
    except Exception as exc:  # noqa: BLE001 - any refusal by autocast is the user's one-line error
        raise IgdError(f"--precision {precision}: torch.autocast cannot run {dtype} on {dev.type} here "
                       f"({type(exc).__name__}); use fp32") from exc
    if got != dtype:
        raise IgdError(f"--precision {precision}: torch.autocast on {dev.type} does not compute in {dtype}; use fp32")
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """``torch.autocast`` on ``device``'s type in ``precision`` (nothing for fp32)."""
    dtype = DTYPES[check_precision(precision)]
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """No autocast inside (checks that compare two computations of one value must not compare rounding)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield


def precision_meta(precision: str) -> dict[str, Any]:
    """The precision as identities record it: nothing for fp32 (identities made before ``--precision`` stay valid),
    ``{"precision": name}`` otherwise."""
    return {} if check_precision(precision) == "fp32" else {"precision": precision}


def memory_format(x: torch.Tensor, precision: str) -> torch.Tensor:
    """``x`` in ``channels_last`` for a low-precision pass on CUDA (tensor-core convolutions want it; a
    channels-last input makes every convolution after it channels-last), else unchanged. Not on CPU: measured
    there, bf16 convolutions ran slower in channels_last (docs/gpu.md). Only the input is converted: the model
    is shared with fp32 stages (attacks), whose numbers must not move."""
    if x.is_cuda and x.ndim == 4 and DTYPES.get(precision) is not None:
        return x.contiguous(memory_format=torch.channels_last)
    return x


__all__ = ["ATTACKS_NOTE", "DTYPES", "PRECISIONS", "PrecisionName", "autocast", "check_precision", "full_precision",
           "memory_format", "precision_meta"]
