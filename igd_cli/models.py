"""Model registry: ``--model`` resolves to a loaded, eval-mode ``nn.Module`` taking images in [0, 1].

Sources, keyed like RobustBench keys its zoo:
``demo`` (the embedded digits CNN), ``torchvision:NAME[:WEIGHTS]``, a state-dict file with ``--arch``, and
any other name is looked up in the RobustBench zoo (model dir ``$IGD_HOME/models``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ._compat import reachable
from .archs import ARCHS, CIFAR_SHAPE, IMAGENET_MEAN, IMAGENET_SHAPE, IMAGENET_STD, Normalized
from .artifacts import load_artifact, load_state_dict_file
from .download import GDRIVE_HOST, NotOneFile, zoo_checkpoint_fill
from .errors import IgdError
from .home import igd_home, model_dir  # noqa: F401  (igd_home: importable from here as before)

DEMO_WEIGHTS = "demo.safetensors"

#: Data set the RobustBench zoo files a model under (ours -> theirs).
RB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}
#: Input shape (C, H, W) of a zoo data set's models (ImageNet: RobustBench's resize 256, centre crop 224).
ZOO_INPUT_SHAPES = {"cifar10": CIFAR_SHAPE, "cifar100": CIFAR_SHAPE, "imagenet": IMAGENET_SHAPE}
#: Default l-inf budget per data set (the paper's; the demo model carries its own).
DEFAULT_EPS = {"cifar10": 8 / 255, "cifar100": 8 / 255, "imagenet": 4 / 255, "mnist": 0.3}
DEFAULT_EPS_L2 = {"cifar10": 0.5, "cifar100": 0.5, "imagenet": 3.0}


@dataclass
class LoadedModel:
    """A model ready to use, with what the rest of igd needs to know about it.

    Example::

        loaded = load_model("demo")
        loaded.model, loaded.fingerprint, loaded.num_classes, loaded.eps   # nn.Module on images in [0, 1], ...
    """

    model: nn.Module
    name: str
    source: str  # demo | robustbench | torchvision | file
    fingerprint: str
    num_classes: int
    dataset: str | None = None  # the data set the model was trained for, when known
    eps: float | None = None  # the l-inf budget it was trained for, when known
    default_layer: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # (C, H, W) of one image, when the model's source says it

    def masked_layer(self, input_shape: tuple[int, ...]) -> tuple[str | None, str]:
        """The layer masked when ``--layer`` is not given, and how it was chosen: the architecture's penultimate
        layer, else (your own architecture) the module feeding the classifier (:func:`igd_cli.layers.feeding_layer`),
        else ``(None, why not)``."""
        if self.default_layer is not None:
            return self.default_layer, "the model's penultimate layer"
        from .layers import feeding_layer

        return feeding_layer(self.model, input_shape)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "source": self.source, "model_fingerprint": self.fingerprint,
                "num_classes": self.num_classes, "dataset": self.dataset, "eps": self.eps,
                "default_layer": self.default_layer,
                "input_shape": list(self.input_shape) if self.input_shape else None}


_FINGERPRINTS: dict[int, tuple[int, str]] = {}


def fingerprint(model: nn.Module) -> str:
    """A 16-hex-digit sha256 of the model's identity: the state dict (names, dtypes, shapes and values) and the
    architecture's code (:func:`architecture_digest`), so the same weights under another forward are another model."""
    h = hashlib.sha256()
    h.update(architecture_digest(model).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def architecture_digest(model: nn.Module) -> str:
    """sha256 of what the forward computes beyond the weights: the module tree with its settings (``repr``) and
    the source files defining every module class outside torch (a user's ``--arch file.py``, igd's own archs),
    which hold the forwards and the constants they use. torch's own layers are identified by their settings."""
    h = hashlib.sha256(repr(model).encode())
    files = set()
    for m in model.modules():
        cls = type(m)
        if cls.__module__.split(".")[0] == "torch":
            continue
        files.add(_class_file(cls))
    # each file by its content's digest, the digests in sorted order: where the files lie (a clone's folder, a copy
    # of a user's file) changes neither which files count nor their order
    parts = sorted(hashlib.sha256(Path(f).read_bytes() if Path(f).is_file() else f.encode()).hexdigest()
                   for f in files)
    for d in parts:
        h.update(d.encode())
    return h.hexdigest()


def _class_file(cls: type) -> str:
    """The file defining ``cls``: read from its methods' code (which works for a module loaded from a path without
    being registered in ``sys.modules``), else from inspect; its qualified name where no file exists."""
    for value in vars(cls).values():
        code = getattr(value, "__code__", None)
        if code is not None and Path(code.co_filename).is_file():
            return code.co_filename
    try:
        return inspect.getsourcefile(cls) or f"{cls.__module__}.{cls.__qualname__}"
    except TypeError:  # defined where no source exists (typed at an interactive prompt)
        return f"{cls.__module__}.{cls.__qualname__}"


def load_model(spec: str = "demo", arch: str | None = None, dataset: str | None = None,
               threat_model: str = "Linf", device: torch.device | str = "cpu", *,
               zoo_dataset: str | None = None, normalize: str | None = None) -> LoadedModel:
    """Resolve ``--model`` (and ``--arch``, ``--normalize``) into a :class:`LoadedModel` in eval mode on ``device``.

    ``dataset`` (``--dataset``) names the images only; for a zoo name listed under several data sets it picks
    among them when it is one of them. ``zoo_dataset`` (``--zoo-dataset``) picks the zoo entry explicitly.

    Example::

        loaded = load_model("demo")                                 # the bundled digits model
        loaded = load_model("weights.pt", arch="resnet18")          # a state-dict file (normalize="cifar10" when
                                                                    # its normalisation is not inside it)
        # a RobustBench zoo entry, downloaded once: load_model("Addepalli2022Efficient_RN18", dataset="cifar10")
    """
    spec = (spec or "demo").strip()
    is_file = Path(spec).suffix in (".pt", ".pth", ".safetensors") or os.sep in spec
    if normalize is not None and (spec == "demo" or spec.startswith("torchvision:") or not is_file):
        raise IgdError(f"--normalize applies to a state-dict file (--model PATH --arch ...), not to --model {spec}")
    if spec == "demo":
        loaded = _load_demo()
    elif spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec)
    elif is_file:
        loaded = _load_file(spec, arch, normalize)
    else:
        loaded = _load_robustbench(spec, threat_model, zoo_dataset=zoo_dataset, prefer=dataset)
    if zoo_dataset is not None and loaded.source != "robustbench":
        raise IgdError(f"--zoo-dataset {zoo_dataset}: only for RobustBench zoo names, not --model {spec}")
    loaded.model.eval().to(device)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded


# --- demo -------------------------------------------------------------------------------------------

def demo_weights_path() -> Path:
    try:
        return Path(str(resources.files("igd_cli._demo").joinpath(DEMO_WEIGHTS)))
    except ModuleNotFoundError:  # a source tree on sys.path without `pip install` (benchmarks/, scripts/)
        return Path(__file__).resolve().parents[1] / "artifacts" / "demo" / DEMO_WEIGHTS


def _load_demo() -> LoadedModel:
    path = demo_weights_path()
    if not path.exists():
        raise IgdError(f"the demo model's weights are missing: {path} (re-run scripts/train_demo.py)")
    art = load_artifact(path, kind="model")
    net = ARCHS["demo-cnn"].build(int(art.meta.get("num_classes", 10)))
    net.load_state_dict(art.tensors)
    return LoadedModel(net, "demo", "demo", fingerprint(net), int(art.meta.get("num_classes", 10)),
                       dataset="digits", eps=float(art.meta["eps"]), default_layer="block3",
                       info={k: art.meta[k] for k in ("clean_accuracy", "pgd_accuracy") if k in art.meta},
                       input_shape=ARCHS["demo-cnn"].input_shape)


# --- state-dict files -------------------------------------------------------------------------------

def _load_file(spec: str, arch: str | None, normalize: str | None = None) -> LoadedModel:
    from .user_arch import build_user_arch, check_channels, is_user_arch, parse_normalize

    path = Path(spec).expanduser()
    if arch is None:
        raise IgdError(f"--model {spec}: a state-dict file needs --arch (one of {', '.join(ARCHS)}, or your own "
                       "MODULE:CALLABLE or path/to/file.py:CALLABLE)")
    user = is_user_arch(arch)
    if not user and arch not in ARCHS:
        raise IgdError(f"--arch {arch}: unknown architecture (choose from {', '.join(ARCHS)}, or your own "
                       "MODULE:CALLABLE or path/to/file.py:CALLABLE)")
    norm = parse_normalize(normalize) if normalize is not None else None
    state = load_state_dict_file(path)
    if user:
        state = _strip_prefix(state)
        net, num_classes = build_user_arch(arch, state, path)
        state = _clean_state_dict(state, expected=set(net.state_dict()))
        default_layer = None
        input_shape = None  # the user's network does not say
    else:
        spec_arch = ARCHS[arch]
        state = _clean_state_dict(state)
        key = spec_arch.classifier_key
        cands = [k for k in state if k == key or k.endswith("." + key)]
        if not cands:
            raise IgdError(f"{path}: no {key!r} in the state dict: not a {arch} checkpoint")
        num_classes = int(state[cands[0]].shape[0])
        net = spec_arch.build(num_classes)
        default_layer = spec_arch.default_layer
        input_shape = spec_arch.input_shape
    _load_into(net, state, path, arch)
    info: dict[str, Any] = {"arch": arch}
    if norm is not None:
        if isinstance(net, Normalized):
            raise IgdError(f"--normalize: --arch {arch} already normalises its input")
        check_channels(net, norm[0], normalize)
        net = Normalized(net, *norm, persistent=True)
        info["normalize"] = {"mean": list(norm[0]), "std": list(norm[1])}
        default_layer = f"model.{default_layer}" if default_layer else None
    if default_layer is None:
        default_layer = guess_penultimate(net)
    return LoadedModel(net, str(path), "file", fingerprint(net), num_classes, default_layer=default_layer, info=info,
                       input_shape=input_shape)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without DataParallel's ``module.`` prefix."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _clean_state_dict(state: dict[str, torch.Tensor], expected: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Strip DataParallel's ``module.`` prefix and drop normalisation buffers saved by wrappers (unless the
    network has keys of those names itself, ``expected``)."""
    out = {}
    for k, v in _strip_prefix(state).items():
        is_norm = k.split(".")[0] in ("normalize", "normalizer") or k in ("mu", "sigma", "mean", "std")
        if is_norm and (expected is None or k not in expected):
            continue
        out[k] = v
    return out


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    target = net
    if isinstance(net, Normalized) and not any(k.startswith("model.") for k in state):
        target = net.model
    elif not isinstance(net, Normalized) and all(k.startswith("model.") for k in state) \
            and not all(k.startswith("model.") for k in net.state_dict()):
        state = {k[len("model."):]: v for k, v in state.items()}
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even when strict=False
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc)[:160])
        raise IgdError(f"{path}: does not match --arch {arch} ({first})") from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise IgdError(f"{path}: does not match --arch {arch} ({len(missing)} missing keys, e.g. "
                       f"{missing[:2]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:2]})")


# --- torchvision ------------------------------------------------------------------------------------

def _load_torchvision(spec: str) -> LoadedModel:
    import torchvision

    parts = spec.split(":")
    name = parts[1] if len(parts) > 1 else ""
    weights_name = parts[2] if len(parts) > 2 else "DEFAULT"
    try:
        builder = torchvision.models.get_model_builder(name)
        weights_enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as exc:
        raise IgdError(f"--model {spec}: unknown torchvision model {name!r}") from exc
    try:
        weights = weights_enum[weights_name] if weights_name != "DEFAULT" else weights_enum.DEFAULT
    except KeyError as exc:
        raise IgdError(f"--model {spec}: unknown weights {weights_name!r} "
                       f"(choose from {', '.join(w.name for w in weights_enum)})") from exc
    filename = Path(weights.url).name
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    offline = f"cannot download torchvision weights for {name} (offline?): place {filename} at {target}"
    if not target.exists() and not reachable(weights.url):
        raise IgdError(offline)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            net = builder(weights=weights)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        raise IgdError(offline) from exc
    tf = weights.transforms()
    mean = tuple(tf.mean) if hasattr(tf, "mean") else IMAGENET_MEAN
    std = tuple(tf.std) if hasattr(tf, "std") else IMAGENET_STD
    model = Normalized(net, mean, std)
    layer = "model.layer4" if hasattr(net, "layer4") else None
    crop = getattr(tf, "crop_size", None)  # the weights' own evaluation crop (224 for most, 299 for Inception)
    shape = (3, int(crop[0]), int(crop[0])) if crop else IMAGENET_SHAPE
    return LoadedModel(model, spec, "torchvision", fingerprint(model), len(weights.meta["categories"]),
                       dataset="imagenet", default_layer=layer, info={"weights": weights.name}, input_shape=shape)


# --- RobustBench -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ZooEntry:
    """Where the RobustBench zoo files a model: the data set and threat model used, every data set that lists
    the name under that threat model (zoo order), and what chose among them."""

    name: str
    dataset: str
    threat_model: str
    listed_under: tuple[str, ...]
    chosen_by: str  # only entry | --zoo-dataset | --dataset | local checkpoint | zoo order

    def checkpoint(self) -> Path:
        """Where robustbench reads (or downloads) the checkpoint."""
        return zoo_checkpoint(self.name, self.dataset, self.threat_model)


def zoo_checkpoint(name: str, dataset: str, threat_model: str) -> Path:
    """``$IGD_HOME/models/<dataset>/<threat model>/<name>.pt``: robustbench's model-dir layout."""
    return model_dir() / dataset / threat_model / f"{name}.pt"


def robustbench_entry(name: str, threat_model: str = "Linf", *, zoo_dataset: str | None = None,
                      prefer: str | None = None) -> ZooEntry:
    """Find ``name`` in the RobustBench zoo; the zoo, not the images, says its data set.

    A name listed under several data sets (``Addepalli2022Efficient_RN18``: cifar10 and cifar100) is resolved
    by ``zoo_dataset``, else by ``prefer`` (``--dataset``) when it is one of them, else by the one data set whose
    checkpoint is already in the model dir, else by the zoo's order (cifar10 first). Raises a one-line error.

    >>> robustbench_entry("Addepalli2022Efficient_RN18", zoo_dataset="cifar100").dataset
    'cifar100'
    """
    from ._compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import ThreatModel

    try:
        tm = ThreatModel(threat_model)
    except ValueError as exc:
        raise IgdError(f"--threat-model {threat_model}: expected Linf or L2") from exc
    if zoo_dataset is not None and zoo_dataset not in RB_DATASETS:
        raise IgdError(f"--zoo-dataset {zoo_dataset}: expected one of {', '.join(RB_DATASETS)}")
    listed = tuple(ds.value for ds in model_dicts if name in model_dicts[ds].get(tm, {}))
    if not listed:
        raise IgdError(f"--model {name}: not a file, not torchvision:NAME, and not in the RobustBench zoo "
                       f"({'/'.join(d.value for d in model_dicts)}, {tm.value})")

    def entry(ds: str, how: str) -> ZooEntry:
        return ZooEntry(name, ds, tm.value, listed, how)

    if zoo_dataset is not None:
        if RB_DATASETS[zoo_dataset] not in listed:
            raise IgdError(f"--model {name}: not listed under --zoo-dataset {zoo_dataset} ({tm.value}) in the "
                           f"RobustBench zoo; it is under {', '.join(listed)}")
        return entry(RB_DATASETS[zoo_dataset], "--zoo-dataset")
    if len(listed) == 1:
        return entry(listed[0], "only entry")
    if prefer in RB_DATASETS and RB_DATASETS[prefer] in listed:
        return entry(RB_DATASETS[prefer], "--dataset")
    present = [ds for ds in listed if zoo_checkpoint(name, ds, tm.value).exists()]
    if len(present) == 1:
        return entry(present[0], "local checkpoint")
    return entry(listed[0], "zoo order")


def _load_robustbench(name: str, threat_model: str, *, zoo_dataset: str | None = None,
                      prefer: str | None = None) -> LoadedModel:
    from ._compat import import_robustbench

    rb = import_robustbench()
    zoo = robustbench_entry(name, threat_model, zoo_dataset=zoo_dataset, prefer=prefer)
    ds, tm = zoo.dataset, zoo.threat_model
    root = model_dir()
    path = zoo.checkpoint()
    offline = f"cannot download RobustBench model {name} (offline?): place its checkpoint at {path}"
    if not path.exists():
        # filled once, under a lock, complete or not at all (several array tasks may start here at once)
        try:
            zoo_checkpoint_fill(name, ds, tm, path)
        except NotOneFile as exc:  # an ensemble of files: robustbench fetches its parts itself
            if not reachable(GDRIVE_HOST):
                raise IgdError(offline) from exc
    try:
        # robustbench prints download messages on stdout, which belongs to --json results.
        with contextlib.redirect_stdout(sys.stderr):
            net = rb.utils.load_model(model_name=name, model_dir=str(root), dataset=ds, threat_model=tm)
    except Exception as exc:  # gdown/requests/hub errors when offline
        if path.exists():
            raise IgdError(f"{path}: cannot load RobustBench checkpoint for {name} "
                           f"({' '.join(str(exc).split())[:200]})") from exc
        raise IgdError(offline) from exc
    if zoo.chosen_by == "zoo order":
        from .console import err_console

        err_console.print(f"note: {name} is listed under {' and '.join(zoo.listed_under)} ({tm}) in the RobustBench "
                          f"zoo; using {ds} (pass --zoo-dataset to choose)", highlight=False, soft_wrap=True)
    num_classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[ds]
    eps = (DEFAULT_EPS if tm == "Linf" else DEFAULT_EPS_L2).get(ds)
    return LoadedModel(net, name, "robustbench", fingerprint(net), num_classes, dataset=ds, eps=eps,
                       default_layer=guess_penultimate(net), input_shape=ZOO_INPUT_SHAPES[ds],
                       info={"threat_model": tm, "checkpoint": str(path), "zoo_dataset": ds,
                             "zoo_listed_under": list(zoo.listed_under), "zoo_dataset_chosen_by": zoo.chosen_by})


def guess_penultimate(model: nn.Module) -> str | None:
    """The usual masked layer of ResNets/WideResNets: ``layer4`` or ``block3``, possibly under a wrapper."""
    names = [n for n, _ in model.named_modules()]
    for want in ("layer4", "block3"):
        hits = [n for n in names if n == want or n.endswith("." + want)]
        if hits:
            return min(hits, key=len)
    return None
