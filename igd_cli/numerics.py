"""``--numerics``: how floating point runs on a GPU, set before anything is computed and recorded with every result.

``pinned`` (the default) turns TF32 off (torch runs "fp32" cuDNN convolutions in TF32 unless told otherwise, with
a 10-bit mantissa), turns on deterministic algorithms where torch has them
(``torch.use_deterministic_algorithms(True, warn_only=True)``: an operation without one warns instead of failing;
torch's filling of uninitialized memory, a debugging aid that costs time on every allocation and changes nothing
in code that reads only what it wrote, stays off), makes cuDNN pick deterministic algorithms without autotuning
(``cudnn.benchmark`` off: autotuning times candidate algorithms per shape and keeps the fastest, which can differ
from run to run), and sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's reproducible workspace) when CUDA has not
started and it is not set. A rerun on the same GPU model, torch and batch size then gives the same bits.

``fast`` is the opt-in for speed: TF32 on and cuDNN autotuning, no deterministic algorithms. Figures can move
(a few images near the decision boundary), so every result records which was used and caches and merges keep the
two apart. A CPU has neither TF32 nor cuDNN: there both modes set the same flags, and only the record says which
was asked for.

Example::

    apply("pinned", torch.device("cuda"))
    record(torch.device("cuda"))   # {"mode": "pinned", "device": "NVIDIA H100 ...", "tf32": False, ...}
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Literal, Mapping, get_args

import torch

from .errors import IgdError

Mode = Literal["pinned", "fast"]
MODES: tuple[str, ...] = get_args(Mode)
DEFAULT: Mode = "pinned"
#: the cuBLAS workspace setting torch documents for reproducible cuBLAS results
CUBLAS_WORKSPACE = ":4096:8"
#: the keys of :func:`record` that can change a figure, compared by every cache and merge (:func:`identity`); the
#: device's name and the torch, CUDA and cuDNN versions are recorded, not compared (docs/same-answer.md)
IDENTITY_KEYS = ("device_type", "tf32", "deterministic")

_applied: str | None = None  # the mode last applied in this process (None: none yet)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else one ``IgdError`` line."""
    if mode not in MODES:
        raise IgdError(f"--numerics {mode}: expected {' or '.join(MODES)}")
    return mode


def apply(mode: str = DEFAULT, device: torch.device | str | None = None) -> None:
    """Set torch's process-wide flags for ``mode`` (module doc). On a CPU ``device`` both modes set ``pinned``'s
    flags (TF32 and cuDNN are CUDA's; the CPU's own reduced-precision switches stay off)."""
    global _applied
    check_mode(mode)
    fast = mode == "fast" and (device is None or torch.device(device).type != "cpu")
    b = torch.backends
    precision = "tf32" if fast else "ieee"
    b.cuda.matmul.fp32_precision = precision
    b.cudnn.conv.fp32_precision = precision
    b.cudnn.rnn.fp32_precision = precision
    b.mkldnn.matmul.fp32_precision = "ieee"
    b.mkldnn.conv.fp32_precision = "ieee"
    b.cudnn.benchmark = fast
    b.cudnn.deterministic = not fast
    if not fast and not torch.cuda.is_initialized():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read by cuBLAS when CUDA starts
    deterministic_algorithms(not fast)
    torch.utils.deterministic.fill_uninitialized_memory = False
    _applied = mode


def deterministic_algorithms(on: bool, warn_only: bool = True) -> None:
    """``torch.use_deterministic_algorithms(on, warn_only=warn_only)`` without importing ``torch._inductor`` when
    nothing has (it takes seconds, at every start of every command; its only other effect is the flag of
    inductor's own config, which igd never compiles with)."""
    if "torch._inductor.config" in sys.modules or not hasattr(torch._C, "_set_deterministic_algorithms"):
        torch.use_deterministic_algorithms(on, warn_only=warn_only)
    else:
        torch._C._set_deterministic_algorithms(on, warn_only=warn_only)


def ensure() -> str:
    """The mode applied in this process, applying :data:`DEFAULT` first when none was (library use without
    :func:`apply`: igd computes with pinned numerics unless asked otherwise)."""
    if _applied is None:
        apply(DEFAULT)
    return str(_applied)


def _effective(*chain: str) -> str:
    """An fp32 precision setting as torch resolves it: the first that is not ``none`` (operation, backend,
    global), else full precision."""
    return next((p for p in chain if p != "none"), "ieee")


def tf32(device_type: str) -> bool:
    """Whether fp32 matmuls or convolutions on ``device_type`` may run in reduced precision (TF32 on CUDA; oneDNN's
    reduced modes on a CPU) under torch's current flags."""
    b = torch.backends
    if device_type == "cuda":
        ops = [(b.cuda.matmul.fp32_precision, "none"), (b.cudnn.conv.fp32_precision, b.cudnn.fp32_precision),
               (b.cudnn.rnn.fp32_precision, b.cudnn.fp32_precision)]
    else:
        ops = [(b.mkldnn.matmul.fp32_precision, b.mkldnn.fp32_precision),
               (b.mkldnn.conv.fp32_precision, b.mkldnn.fp32_precision)]
    return any(_effective(op, backend, b.fp32_precision) != "ieee" for op, backend in ops)


def deterministic(device_type: str) -> bool:
    """Whether torch's deterministic algorithms are on (and, on CUDA, cuDNN's deterministic algorithms without
    autotuning) under torch's current flags."""
    on = torch.are_deterministic_algorithms_enabled()
    if device_type == "cuda":
        on = on and bool(torch.backends.cudnn.deterministic) and not torch.backends.cudnn.benchmark
    return on


def device_name(device: torch.device) -> str:
    """The GPU's name (``NVIDIA H100 80GB HBM3``), or the CPU's architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine() or 'unknown'})"


def record(device: torch.device | str) -> dict[str, Any]:
    """The numerics a result on ``device`` is computed with, as every results JSON and artifact records them: the
    mode, the device, the torch, CUDA and cuDNN versions, TF32 and determinism (read back from torch's flags)."""
    mode = ensure()
    dev = torch.device(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"mode": mode, "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": cudnn, "tf32": tf32(dev.type),
            "deterministic": deterministic(dev.type)}


def identity(device: torch.device | str) -> dict[str, Any]:
    """The part of :func:`record` that caches and merges compare (:data:`IDENTITY_KEYS`)."""
    return identity_of(record(device))


def identity_of(numerics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """:data:`IDENTITY_KEYS` of a record or identity as stored in metadata (None when there is none: made by an
    igd that did not record numerics)."""
    if not isinstance(numerics, Mapping):
        return None
    return {k: numerics.get(k) for k in IDENTITY_KEYS}


def describe(numerics: Mapping[str, Any] | None) -> str:
    """One phrase for people: ``cuda with TF32 off and deterministic algorithms``, ``pinned (cpu with
    deterministic algorithms)`` for a record (``not recorded`` for None)."""
    if not isinstance(numerics, Mapping):
        return "not recorded (an older igd)"
    parts = []
    if numerics.get("device_type") == "cuda" or numerics.get("tf32"):
        parts.append("TF32 on" if numerics.get("tf32") else "TF32 off")
    parts.append("deterministic algorithms" if numerics.get("deterministic") else "non-deterministic algorithms")
    text = f"{numerics.get('device_type')} with {' and '.join(parts)}"
    return f"{numerics['mode']} ({text})" if "mode" in numerics else text


def snapshot() -> tuple[Any, ...]:
    """Every flag :func:`apply` sets, and the mode (to put them back with :func:`restore`)."""
    b = torch.backends
    return (_applied, b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision,
            b.mkldnn.matmul.fp32_precision, b.mkldnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def restore(state: tuple[Any, ...]) -> None:
    """Put back what :func:`snapshot` saw."""
    global _applied
    b = torch.backends
    (_applied, b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision,
     b.mkldnn.matmul.fp32_precision, b.mkldnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
     det, warn_only, torch.utils.deterministic.fill_uninitialized_memory, cublas) = state
    deterministic_algorithms(det, warn_only)
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


__all__ = ["CUBLAS_WORKSPACE", "DEFAULT", "IDENTITY_KEYS", "MODES", "Mode", "apply", "check_mode", "describe",
           "deterministic", "deterministic_algorithms", "device_name", "ensure", "identity", "identity_of", "record",
           "restore", "snapshot", "tf32"]
