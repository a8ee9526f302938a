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
from .models import DEFAULT_EPS, DEFAULT_EPS_L2, LoadedModel, load_model
from .numerics import DEFAULT as DEFAULT_NUMERICS
from .numerics import apply as apply_numerics
from .numerics import check_mode as check_numerics


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


#: What uses ε when the defence smooths (for :meth:`Target.default_eps`'s error).
FOR_SMOOTHING = "σ = ε/2 of the randomized smoothing; or pass --sigma, or --no-rs"


#: images a command evaluates on when --n-examples is not given: the first 1000 (all if fewer), as the paper
DEFAULT_N_EXAMPLES = 1000


@dataclass
class Target:
    """A model, its device and the data set it is used with.

    Example::

        target = open_target("demo")
        images = target.data("test", 100)          # the first 100 test images of its data set
        target.model, target.device, target.default_eps()
    """

    loaded: LoadedModel
    device: torch.device
    dataset: str
    threat_model: str = "Linf"

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def data(self, split: str, n: int | None, data_dir: Path | None = None) -> ImageSet:
        return load_dataset(self.dataset, split, n, data_dir)

    def eval_data(self, split: str, n: int | None, data_dir: Path | None = None) -> ImageSet:
        """The first ``n`` images of the split; ``None``: the first :data:`DEFAULT_N_EXAMPLES` (all if fewer), the
        default of every command that evaluates (calibrate-k, attack, defend-eval, the pipeline's paper preset)."""
        data = self.data(split, n, data_dir)
        if n is None:
            data.n = min(DEFAULT_N_EXAMPLES, len(data))
        return data

    def default_eps(self, needed_for: str = "the attacks' budget") -> float:
        """ε when ``--eps`` is not given: the model's own (zoo entry, demo model), else the data set's default for
        the threat model. Call it only where ε is used; ``needed_for`` says what uses it in the error."""
        if self.loaded.eps is not None:
            return self.loaded.eps
        table = DEFAULT_EPS_L2 if self.threat_model == "L2" else DEFAULT_EPS
        if self.dataset in table:
            return table[self.dataset]
        raise IgdError(f"no default ε for --dataset {self.dataset}, and the model does not carry one: pass --eps "
                       f"(needed for {needed_for})")

    def provenance(self) -> dict[str, Any]:
        """What every artifact made with this target records: the model, the data set, and igd's code and the
        numerics (:func:`igd_cli.provenance.record`)."""
        return {"model": self.loaded.name, "model_fingerprint": self.loaded.fingerprint,
                "num_classes": self.loaded.num_classes, "dataset": self.dataset, **self.record()}

    def record(self) -> dict[str, Any]:
        """``igd_code`` and ``numerics`` as every results JSON and artifact records them
        (:func:`igd_cli.provenance.record`)."""
        from .provenance import record

        return record(self.device)

    def identity(self) -> dict[str, Any]:
        """``igd_code`` and ``numerics`` as every identity compares them (:func:`igd_cli.provenance.identity`)."""
        from .provenance import identity

        return identity(self.device)


def open_target(model: str = "demo", arch: str | None = None, dataset: str | None = None, threat_model: str = "Linf",
                device: str = "auto", zoo_dataset: str | None = None, normalize: str | None = None,
                numerics: str = DEFAULT_NUMERICS) -> Target:
    """The model named by ``--model``/``--arch`` (a zoo entry by ``--zoo-dataset``) on ``device``, with the
    images of ``--dataset`` (default: the data set the model was trained on); ``normalize`` (``--normalize``) wraps
    a state-dict model whose normalisation is not inside it. ``numerics`` (``--numerics``) is applied before the
    model reaches the device (:mod:`igd_cli.numerics`).

    >>> open_target("demo").dataset
    'digits'
    """
    check_numerics(numerics)
    dev = resolve_device(device)
    apply_numerics(numerics, dev)
    loaded = load_model(model, arch, dataset, threat_model, dev, zoo_dataset=zoo_dataset, normalize=normalize)
    ds = dataset or loaded.dataset
    if ds is None:
        raise IgdError(f"--model {model}: pass --dataset (e.g. cifar10 or PATH.safetensors; the model does not say "
                       f"which data it was trained on)")
    return Target(loaded, dev, ds, threat_model)


def parse_input_shape(text: str | None) -> tuple[int, int, int] | None:
    """``--input-shape 3,32,32`` (or ``3x32x32``) -> (3, 32, 32); None stays None."""
    if text is None:
        return None
    parts = text.replace("x", ",").replace("×", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise IgdError(f"--input-shape {text!r}: expected C,H,W of one image, e.g. 3,32,32")
    return shape  # type: ignore[return-value]


def model_input_shape(loaded: LoadedModel, given: tuple[int, ...] | None, dataset: str | None,
                      data_dir: Path | None = None) -> tuple[int, ...]:
    """The (C, H, W) of one image for ``loaded``: ``--input-shape``, else what the architecture or zoo entry says,
    else the first image of the data set (``--dataset`` or the model's own): only then is data read."""
    if given is not None:
        return tuple(given)
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape)
    ds = dataset or loaded.dataset
    if ds is None:
        raise IgdError(f"--model {loaded.name}: its input shape is unknown: pass --input-shape C,H,W (or --dataset)")
    return tuple(load_dataset(ds, "test", 1, data_dir).get(0, 1).x.shape[1:])


def resolve_model_layer(target: Target, layer: str | None, input_shape: tuple[int, ...],
                        chosen: dict[str, str] | None = None) -> tuple[str, int]:
    """The full layer name (default: :meth:`LoadedModel.masked_layer`, the penultimate layer or the module feeding
    the classifier; then ``chosen["layer_chosen_by"]`` says which) and its neuron count N."""
    if layer is None:
        layer, why = target.loaded.masked_layer(input_shape)
        if layer is None:
            raise IgdError(f"--layer is required for this model: {why} (igd layers --model ... lists the layers)")
        if chosen is not None:
            chosen["layer_chosen_by"] = why
    name = resolve_layer(target.model, layer)
    shape = layer_output_shape(target.model, name, input_shape)
    return name, shape[0]


def check_classes(target: Target, data: ImageSet) -> None:
    """The model's classes (and image channels, when the model says its input shape) must match the data's."""
    loaded = target.loaded
    hint = ""
    if loaded.source == "robustbench" and len(loaded.info.get("zoo_listed_under", ())) > 1:
        hint = f" (this zoo entry is {loaded.dataset}'s: pass --zoo-dataset to choose another)"
    if loaded.num_classes != data.num_classes:
        raise IgdError(f"--dataset {data.name} has {data.num_classes} classes but the model predicts "
                       f"{loaded.num_classes}{hint}")
    if loaded.input_shape is not None and len(data):
        channels = int(data.get(0, 1).x.shape[1])
        if channels != loaded.input_shape[0]:
            raise IgdError(f"--dataset {data.name} has {channels}-channel images but the model takes "
                           f"{'×'.join(map(str, loaded.input_shape))}")
