"""The user's own architecture (``--arch MODULE:CALLABLE`` or ``--arch path/to/file.py:CALLABLE``) and
``--normalize MEAN,STD`` for networks whose input normalisation is not inside them.

The callable builds the network (given ``num_classes`` when its signature has that parameter); ``--model PATH``
holds its weights as for the built-in architectures. The class count is read from the classifier's weight in the
state dict (the last ``nn.Linear`` of the built network, else its last weight of two or more dimensions). Every
problem (no such module, file or attribute; not callable; not an ``nn.Module``; raising when called or imported)
is one :class:`IgdError` line. Example::

    net, n = build_user_arch("examples/mnist_cnn.py:small_cnn", state, Path("mnist_cnn.safetensors"))
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .archs import IMAGENET_MEAN, IMAGENET_STD
from .errors import IgdError

#: ``--normalize`` names -> (mean, std) per channel, of images in [0, 1]
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "mnist": ((0.1307,), (0.3081,)),
}


def is_user_arch(arch: str | None) -> bool:
    """True for ``MODULE:CALLABLE`` / ``FILE.py:CALLABLE`` (the built-in names have no colon)."""
    return arch is not None and ":" in arch


def _split_spec(spec: str, option: str = "--arch") -> tuple[str, str]:
    source, _, attr = spec.strip().rpartition(":")
    if not source or not attr:
        raise IgdError(f"{option} {spec}: expected MODULE:CALLABLE or path/to/file.py:CALLABLE")
    return source, attr


def _is_file(source: str) -> bool:
    return source.endswith(".py") or os.sep in source or "/" in source


@contextmanager
def _on_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` inside the block (imports next to the user's file or working directory)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_source(spec: str, source: str, option: str = "--arch") -> Any:
    if _is_file(source):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise IgdError(f"{option} {spec}: no such file {source}")
        # keyed by the path and the file's content: a file edited since it was imported (a notebook, a long-lived
        # process) is imported again, so what runs is what the source digest in every identity describes
        key = str(path).encode() + b"\0" + path.read_bytes()
        name = "igd_user_arch_" + hashlib.sha1(key).hexdigest()[:16]
        if name in sys.modules:
            return sys.modules[name]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise IgdError(f"{option} {spec}: {source} is not a Python file")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            with _on_path(str(path.parent)):
                mod_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file may fail in any way
            del sys.modules[name]
            raise IgdError(f"{option} {spec}: importing {source} failed ({_why(exc)})") from exc
        return module
    try:
        with _on_path(os.getcwd()):
            return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (source == exc.name or source.startswith(exc.name + ".")):
            raise IgdError(f"{option} {spec}: no module named {source!r}") from exc
        raise IgdError(f"{option} {spec}: importing {source} failed ({_why(exc)})") from exc
    except Exception as exc:  # the user's module may fail in any way
        raise IgdError(f"{option} {spec}: importing {source} failed ({_why(exc)})") from exc


def resolve_callable(spec: str, option: str = "--arch") -> Callable[..., Any]:
    """The callable named by ``spec`` (``MODULE:NAME``, ``FILE.py:NAME``; ``NAME`` may be dotted); ``option``
    names the command-line option in its one-line errors."""
    source, attr = _split_spec(spec, option)
    obj: Any = _import_source(spec, source, option)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise IgdError(f"{option} {spec}: {source} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise IgdError(f"{option} {spec}: {attr} is a {type(obj).__name__}, not callable")
    return obj


def source_file(spec: str, option: str = "--arch") -> Path | None:
    """The Python file ``spec`` names or whose module it names (None for a module without a file): what a
    source digest of ``spec`` hashes."""
    source, _ = _split_spec(spec, option)
    module = _import_source(spec, source, option)
    f = getattr(module, "__file__", None)
    return Path(f).resolve() if f and Path(f).is_file() else None


def takes_num_classes(fn: Callable[..., Any]) -> tuple[bool, Any]:
    """(whether ``fn`` has a ``num_classes`` parameter, its default or ``inspect.Parameter.empty``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False, inspect.Parameter.empty
    p = params.get("num_classes")
    return (p is not None), (p.default if p is not None else inspect.Parameter.empty)


def call_arch(spec: str, fn: Callable[..., Any], num_classes: int | None) -> nn.Module:
    """``fn(num_classes=...)`` (or ``fn()``), checked to return an ``nn.Module``."""
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    call = f"{_split_spec(spec)[1]}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
    try:
        net = fn(**kwargs)
    except Exception as exc:  # the user's code may fail in any way
        raise IgdError(f"--arch {spec}: {call} failed ({_why(exc)})") from exc
    if not isinstance(net, nn.Module):
        raise IgdError(f"--arch {spec}: {call} returned an object of type {type(net).__name__}, "
                       "not a torch.nn.Module")
    return net


def classifier_key(net: nn.Module) -> str | None:
    """State-dict key of the classifier weight: the last ``nn.Linear``'s, else the last weight with ndim ≥ 2."""
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return f"{linears[-1]}.weight" if linears[-1] else "weight"
    weights = [k for k, v in net.state_dict().items() if k.endswith("weight") and v.ndim >= 2]
    return weights[-1] if weights else None


#: class count used to build a network whose callable needs ``num_classes`` before the checkpoint says it
PROVISIONAL_CLASSES = 10


def build_user_arch(spec: str, state: dict[str, torch.Tensor], path: Path) -> tuple[nn.Module, int]:
    """Build the user's network for the checkpoint ``state`` (read from ``path``): (network, class count).

    The count comes from the classifier's weight in ``state``; a callable with a ``num_classes`` parameter is
    (re)built with it, one without must already build that many classes.
    """
    fn = resolve_callable(spec)
    takes, default = takes_num_classes(fn)
    if takes and default is inspect.Parameter.empty:
        net = call_arch(spec, fn, PROVISIONAL_CLASSES)
    else:
        net = call_arch(spec, fn, None)
    key = classifier_key(net)
    if key is None:
        raise IgdError(f"--arch {spec}: the network has no weight matrix to read the number of classes from")
    if key not in state:
        raise IgdError(f"{path}: no {key!r} in the state dict (the classifier of --arch {spec})")
    built = int(net.state_dict()[key].shape[0])
    n = int(state[key].shape[0])
    if n != built:
        if not takes:
            raise IgdError(f"{path}: {key} has {n} classes but --arch {spec} builds {built} (its callable takes no "
                           "num_classes parameter)")
        net = call_arch(spec, fn, n)
    return net, n


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``--normalize``: a name (``cifar10``, ``cifar100``, ``imagenet``, ``mnist``), ``MEAN,STD`` for one value
    per image, or per-channel lists: ``m1,m2,m3,s1,s2,s3`` (means, then stds) or ``m1,m2,m3/s1,s2,s3``."""
    raw = text.strip().lower()
    if raw in NORMALIZATIONS:
        return NORMALIZATIONS[raw]
    bad = IgdError(f"--normalize {text}: expected {', '.join(NORMALIZATIONS)}, or MEAN,STD per channel "
                   "(e.g. 0.5,0.5 or 0.485,0.456,0.406,0.229,0.224,0.225)")
    cleaned = raw.replace("[", "").replace("]", "").replace("(", "").replace(")", "").replace(" ", "")
    try:
        if any(sep in cleaned for sep in "/;"):
            left, right = cleaned.replace(";", "/").split("/")
            mean = tuple(float(v) for v in left.strip(",").split(","))
            std = tuple(float(v) for v in right.strip(",").split(","))
        else:
            values = [float(v) for v in cleaned.split(",")]
            if len(values) % 2:
                raise bad
            mean, std = tuple(values[: len(values) // 2]), tuple(values[len(values) // 2:])
    except ValueError as exc:
        raise bad from exc
    if not mean or len(mean) != len(std):
        raise bad
    if not all(s > 0 for s in std):
        raise IgdError(f"--normalize {text}: every std must be > 0")
    return mean, std


def check_channels(net: nn.Module, mean: tuple[float, ...], text: str) -> None:
    """The normalisation must have one value or one per input channel of the network's first convolution."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and len(mean) not in (1, conv.in_channels):
        raise IgdError(f"--normalize {text}: {len(mean)} channels, but the network's first convolution takes "
                       f"{conv.in_channels}")
