"""CD-IR, CLIP-Dissect importance ranking (METHOD.md step 1b), with CLIP embeddings cached on disk.

1. Probe images through the CLIP image encoder (open_clip, with CLIP's own preprocessing applied to our
   [0, 1] tensors), class names through the text encoder; both L2-normalised; ``P = E_img · E_txtᵀ`` (M, C).
2. ``Q`` (M, N): the spatial mean of each neuron's activation at the masked layer, streamed batch by batch
   (only the running top-K probe indices per neuron are kept, so memory is bounded by the batch).
3. Soft-WPMI exactly as CLIP-Dissect (Oikarinen & Weng, ICLR 2023) computes it, vectorised over neurons.

Text prompts: CLIP-Dissect feeds the bare concept word to the text encoder, so the default template is
``"{}"`` (the class name, underscores replaced by spaces); ``template`` can change it (e.g. ``"a photo of a {}"``).
The CLIP embeddings depend only on (CLIP model, weights, data set, split, prompts), not on the ranked model, so
they are cached in a ``clip-cache`` artifact and reused: ranking another model or layer does not run CLIP again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..artifacts import cached_file_sha256, load_artifact, read_metadata, save_artifact
from ..console import err_console, progress
from ..data import ImageSet
from ..errors import IgdError
from ..home import clip_cache_home
from ..layers import LayerSplit
from ..precision import autocast, memory_format

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "openai"
DEFAULT_TEMPLATE = "{}"
#: soft-WPMI constants of METHOD.md / CLIP-Dissect: a, K, p_start, p_end, λ, ε
SOFT_WPMI = {"a": 10.0, "top_k": 100, "p_start": 0.998, "p_end": 0.97, "lam": 1.0, "eps": 1e-7}
#: the seed an untrained CLIP (``--clip-pretrained none``) is initialised with, so that it is one fixed model
UNTRAINED_SEED = 0


# --- soft-WPMI ---------------------------------------------------------------------------------------

def soft_wpmi(p: torch.Tensor, top_idx: torch.Tensor, *, a: float = 10.0, p_start: float = 0.998,
              p_end: float = 0.97, lam: float = 1.0, eps: float = 1e-7, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Soft-WPMI (N, C) from image-text similarities ``p`` (M, C) and each neuron's top-K probe indices
    ``top_idx`` (K, N), ranked by decreasing activation. Vectorised over neurons (chunked to bound memory)."""
    k, n = top_idx.shape
    s = torch.softmax(a * p.to(torch.float32), dim=1)  # S = softmax(a·P) over classes
    ranks = torch.arange(k, device=p.device, dtype=torch.float32)
    pr = (p_start - ranks / k * (p_start - p_end))[:, None, None]  # p_r, (K, 1, 1)
    step = max(1, chunk_elems // max(1, k * s.shape[1]))
    parts = []
    for j0 in range(0, n, step):
        sg = s[top_idx[:, j0:j0 + step]]  # (K, r, C): S[idx_r(j), c]
        parts.append(torch.log(1 + pr * (sg - 1) + eps).sum(0))
    lmat = torch.cat(parts, 0)  # L (N, C)
    ld = torch.logsumexp(lmat, dim=0, keepdim=True) - math.log(n)  # L_d[c]
    return lmat - lam * ld


class _TopK:
    """Running indices of the K largest values per column over streamed (B, N) batches."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None
        self.index: torch.Tensor | None = None

    def add(self, q: torch.Tensor, offset: int) -> None:
        idx = torch.arange(offset, offset + q.shape[0], device=q.device)[:, None].expand_as(q)
        if self.values is not None:
            q, idx = torch.cat([self.values, q]), torch.cat([self.index, idx])
        k = min(self.k, q.shape[0])
        self.values, pos = torch.topk(q, k, dim=0)
        self.index = idx.gather(0, pos)


# --- the layer's activations ---------------------------------------------------------------------------

def activation_topk(model: nn.Module, layer: str, data: ImageSet, k: int, batch_size: int = 128,
                    show_progress: bool = True, precision: str = "fp32") -> torch.Tensor:
    """Indices (K, N) of the K probe images with the largest spatial-mean activation ``q_j``, per neuron
    (``precision``: the forwards under autocast, :mod:`igd_cli.precision`)."""
    split = LayerSplit(model, layer)
    device = next(iter(model.parameters())).device
    top = _TopK(k)
    with torch.no_grad(), progress() as bar, autocast(precision, device):
        task = bar.add_task("CD-IR activations", total=math.ceil(len(data) / batch_size)) if show_progress else None
        for batch in data.batches(batch_size):
            a, _ = split.head(memory_format(batch.x.to(device), precision))
            q = a.flatten(2).mean(2) if a.ndim > 2 else a  # spatial mean: Q rows for this batch
            top.add(q.to(torch.float32), int(batch.index[0]))
            if task is not None:
                bar.advance(task)
    assert top.index is not None
    return top.index


# --- CLIP ------------------------------------------------------------------------------------------

@dataclass
class Clip:
    model: nn.Module
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # [0, 1] NCHW -> CLIP input
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str
    describe_preprocess: str


def _silence_stdout():
    return contextlib.redirect_stdout(sys.stderr)  # stdout belongs to --json


def pretrained_identity(pretrained: str) -> dict[str, Any]:
    """What identifies the CLIP weights in the cache metadata: the tag, or a local file with its sha256."""
    if pretrained.lower() == "none":
        return {"clip_pretrained": "none", "clip_init_seed": UNTRAINED_SEED}
    path = Path(pretrained).expanduser()
    if path.exists():
        # the weights by content (hashed once per file version), the path only for people
        return {"clip_pretrained": "file", "clip_weights_sha256": cached_file_sha256(path),
                "clip_weights_path": str(path.resolve())}
    return {"clip_pretrained": pretrained}


def load_clip(name: str, pretrained: str, device: torch.device) -> Clip:
    """An open_clip model in eval mode with tensor preprocessing and tokenizer; one-line errors when offline."""
    with warnings.catch_warnings():  # open_clip's imports warn about deprecated torch.jit APIs
        warnings.simplefilter("ignore")
        import open_clip

    if name not in open_clip.list_models():
        raise IgdError(f"--clip-model {name}: unknown to open_clip (e.g. ViT-B-16, ViT-B-32, RN50; "
                       f"open_clip.list_models() lists them)")
    path = Path(pretrained).expanduser()
    if pretrained.lower() == "none":
        arg = None
    elif path.exists():
        arg = str(path)
    elif any(s in pretrained for s in ("/", "\\")) or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise IgdError(f"--clip-pretrained {pretrained}: no such file")
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise IgdError(f"--clip-pretrained {pretrained}: not a tag of {name} (tags: {', '.join(tags) or 'none'};"
                           f" or a local weights file, or none)")
        arg = pretrained
        _fail_fast_offline(open_clip, name, pretrained)
    try:
        with _silence_stdout(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)  # an untrained CLIP is then one fixed model
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=arg, device=device)
    except Exception as exc:  # hub/network/file errors come in many types
        if arg is not None and not path.exists():
            cfg = open_clip.get_pretrained_cfg(name, pretrained)
            where = f"{cfg.get('hf_hub', '').rstrip('/')}" if cfg.get("hf_hub") else cfg.get("url", "?")
            raise IgdError(f"--clip-pretrained {pretrained}: the {name} weights cannot be downloaded (offline?): "
                           f"put open_clip_pytorch_model.bin from the Hugging Face hub repository {where} into the "
                           f"HF cache, or pass --clip-pretrained PATH to a local open_clip checkpoint, or "
                           f"--clip-pretrained none") from exc
        raise IgdError(f"cannot build CLIP {name} with weights {pretrained}: {' '.join(str(exc).split())[:200]}") \
            from exc
    model.eval()
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # HF tokenizers need a download
        raise IgdError(f"--clip-model {name}: its tokenizer cannot be loaded (offline?): {exc}") from exc
    fn, text = tensor_preprocess(preprocess)
    return Clip(model, fn, tokenizer, name, pretrained, text)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _fail_fast_offline(open_clip: Any, name: str, tag: str) -> None:
    """When the hubs are offline (igd's default), look for the weights in the local caches first and raise at
    once if they are absent, instead of letting the hub client time out."""
    if not _offline():
        return
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or "open_clip_pytorch_model.bin"
        names = [filename, "open_clip_model.safetensors"]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in names):
            return
        raise IgdError(f"--clip-pretrained {tag}: the {name} weights are not in the local Hugging Face cache and "
                       f"the hub is offline: put {filename} from the hub repository {repo} into the HF cache "
                       f"(or set IGD_ONLINE=1 where there is network), or pass --clip-pretrained PATH to a local "
                       f"open_clip checkpoint, or --clip-pretrained none")
    url = cfg.get("url", "")
    if url and not (Path("~/.cache/clip").expanduser() / Path(url).name).exists():
        raise IgdError(f"--clip-pretrained {tag}: the {name} weights are not cached and downloads are off: put "
                       f"{Path(url).name} into ~/.cache/clip (or set IGD_ONLINE=1), or pass --clip-pretrained PATH, "
                       f"or --clip-pretrained none")


def tensor_preprocess(preprocess: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """CLIP's own evaluation transform (a torchvision ``Compose`` meant for PIL images) applied to batches of
    [0, 1] float tensors: ``ToTensor`` is dropped, the RGB conversion repeats a grey channel, resizes and crops
    run on the tensor (bicubic with antialias, clamped to [0, 1] like PIL's 8-bit output), ``Normalize`` as is."""
    from torchvision import transforms as T

    steps = list(preprocess.transforms) if isinstance(preprocess, T.Compose) else [preprocess]
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = []
    names: list[str] = []
    for t in steps:
        if isinstance(t, (T.ToTensor, T.PILToTensor)):
            continue
        fname = getattr(t, "__name__", "")
        if "rgb" in fname.lower():
            ops.append(lambda x: x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
            names.append("to_rgb")
        elif isinstance(t, T.Normalize):
            ops.append(t)
            names.append(repr(t))
        elif isinstance(t, nn.Module):
            ops.append(lambda x, t=t: t(x).clamp_(0.0, 1.0))
            names.append(repr(t))
        else:
            raise IgdError(f"unsupported CLIP preprocessing step {t!r}")

    def run(x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = op(x)
        return x

    return run, "; ".join(" ".join(n.split()) for n in names)


def prompts(classes: list[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Text fed to CLIP for each class (CLIP-Dissect: the bare name; underscores become spaces)."""
    if "{}" not in template:
        raise IgdError(f"--clip-template {template!r}: must contain {{}} where the class name goes")
    return [template.format(c.replace("_", " ")) for c in classes]


#: cache metadata that names the images for people, or says how many are cached, but is not compared on reuse
#: (the images are compared by content, ``images``; a cache of more images serves fewer)
NOT_IDENTITY = ("n", "dataset", "split", "clip_weights_path")


def default_cache_path(meta: dict[str, Any]) -> Path:
    """``$IGD_HOME/clip-cache/<clip model>-<data>-<hash>.safetensors``, one file per (CLIP, data, prompts)."""
    key = {k: meta[k] for k in sorted(meta) if k not in NOT_IDENTITY}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    data = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(meta["dataset"])).stem).strip("-")
    return clip_cache_home() / f"{meta['clip_model']}-{data}-{meta['split']}-{digest}.safetensors"


def cache_meta(clip_model: str, clip_pretrained: str, data: ImageSet, template: str,
               device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything the CLIP embeddings depend on (the cache is reused only when all of it matches), igd's code and
    the numerics on ``device`` included."""
    from ..provenance import identity

    return {"clip_model": clip_model, **pretrained_identity(clip_pretrained), "images": data.source_digest(),
            "dataset": data.name, "split": data.split, "n": len(data), "classes": list(data.classes),
            "template": template, **identity(device)}


def _cache_hit(path: Path, want: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached embeddings of the first ``n`` probe images when ``path`` matches ``want``, else None."""
    if not path.exists():
        return None
    meta = read_metadata(path)
    if meta.get("kind") != "clip-cache":
        raise IgdError(f"--clip-cache {path}: not a clip-cache artifact (kind {meta.get('kind')})")
    same = all(meta.get(k) == v for k, v in want.items() if k not in NOT_IDENTITY)
    if not same or not isinstance(meta.get("n"), int) or meta["n"] < want["n"]:
        return None
    art = load_artifact(path, kind="clip-cache")
    img, txt = art["image_embeddings"], art["text_embeddings"]
    if img.ndim != 2 or txt.ndim != 2 or img.shape[0] != meta["n"] or txt.shape[0] != len(want["classes"]) \
            or img.shape[1] != txt.shape[1]:
        raise IgdError(f"--clip-cache {path}: tensors of unexpected shapes {list(img.shape)}, {list(txt.shape)}")
    return img[: want["n"]].to(torch.float32), txt.to(torch.float32)


def clip_embeddings(data: ImageSet, *, clip_model: str = DEFAULT_CLIP_MODEL,
                    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED, template: str = DEFAULT_TEMPLATE,
                    cache: Path | None = None, device: torch.device | str = "cpu", batch_size: int = 128,
                    show_progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, Path, bool]:
    """L2-normalised image (M, D) and text (C, D) embeddings; from the cache when it matches, else computed with
    CLIP and written to it. Returns (images, texts, cache path, reused)."""
    want = cache_meta(clip_model, clip_pretrained, data, template, device)
    path = Path(cache) if cache is not None else default_cache_path(want)
    hit = _cache_hit(path, want)
    if hit is not None:
        return hit[0], hit[1], path, True
    clip = load_clip(clip_model, clip_pretrained, torch.device(device))
    texts = prompts(data.classes, template)
    dev = torch.device(device)
    with torch.no_grad():
        txt = clip.model.encode_text(clip.tokenizer(texts).to(dev)).float()
        txt = txt / txt.norm(dim=1, keepdim=True)
        parts = []
        with progress() as bar:
            task = bar.add_task(f"CLIP {clip_model} images", total=math.ceil(len(data) / batch_size)) \
                if show_progress else None
            for batch in data.batches(batch_size):
                emb = clip.model.encode_image(clip.preprocess(batch.x.to(dev))).float()
                parts.append((emb / emb.norm(dim=1, keepdim=True)).cpu())
                if task is not None:
                    bar.advance(task)
    img = torch.cat(parts)
    if path.exists():
        err_console.print(f"note: {path} holds CLIP embeddings of other settings: replacing it")
    save_artifact(path, "clip-cache", {"image_embeddings": img, "text_embeddings": txt.cpu()},
                  {**want, "prompts": texts, "preprocess": clip.describe_preprocess})
    return img, txt.cpu(), path, False


# --- CD-IR -------------------------------------------------------------------------------------------

@dataclass
class CdIrResult:
    importance: torch.Tensor  # float32 (rows, C) on the CPU
    neurons: tuple[int, int]
    cache: Path
    cache_reused: bool
    info: dict[str, Any] = field(default_factory=dict)


def cd_ir(model: nn.Module, layer: str, data: ImageSet, *, neurons: tuple[int, int] | None = None,
          clip_model: str = DEFAULT_CLIP_MODEL, clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
          template: str = DEFAULT_TEMPLATE, cache: Path | None = None, batch_size: int = 128,
          show_progress: bool = True, precision: str = "fp32", clip_batch_size: int | None = None) -> CdIrResult:
    """CD-IR rows ``neurons`` (default all). ``L_d`` needs every neuron, so a shard computes the full soft-WPMI
    (cheap once the activations are known) and keeps its rows."""
    import time

    device = next(iter(model.parameters())).device
    t0 = time.perf_counter()
    img, txt, path, reused = clip_embeddings(data, clip_model=clip_model, clip_pretrained=clip_pretrained,
                                             template=template, cache=cache, device=device,
                                             batch_size=clip_batch_size or batch_size, show_progress=show_progress)
    t1 = time.perf_counter()
    k = min(int(SOFT_WPMI["top_k"]), len(data))
    top_idx = activation_topk(model, layer, data, k, batch_size, show_progress, precision)
    t2 = time.perf_counter()
    p = img.to(device) @ txt.to(device).T  # P = E_img · E_txtᵀ (M, C)
    consts = {key: v for key, v in SOFT_WPMI.items() if key != "top_k"}
    imp = soft_wpmi(p, top_idx, **consts).to(torch.float32).cpu()
    t3 = time.perf_counter()
    n = imp.shape[0]
    a, b = (0, n) if neurons is None else neurons
    if not 0 <= a < b <= n:
        raise IgdError(f"--neurons {a}:{b}: need 0 <= A < B <= N = {n}")
    info = {"clip_seconds": round(t1 - t0, 3), "activation_seconds": round(t2 - t1, 3),
            "wpmi_seconds": round(t3 - t2, 3), "top_k": k}
    return CdIrResult(imp[a:b].contiguous(), (a, b), path, reused, info)


def params(clip_model: str, clip_pretrained: str, template: str, n_probe: int) -> dict[str, Any]:
    """The settings an importance artifact records (shards merge only when these agree)."""
    ident = {k: v for k, v in pretrained_identity(clip_pretrained).items() if k not in NOT_IDENTITY}
    return {"clip_model": clip_model, **ident, "template": template,
            **{k: v for k, v in SOFT_WPMI.items() if k != "top_k"}, "top_k": min(int(SOFT_WPMI["top_k"]), n_probe)}
