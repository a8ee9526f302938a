"""CD-IR: soft-WPMI against a literal per-neuron loop, streamed top-K, CLIP preprocessing, the embedding cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from igd_cli.artifacts import load_artifact
from igd_cli.data import load_dataset
from igd_cli.errors import IgdError
from igd_cli.layers import capture
from igd_cli.ranking import cd_ir as cd

SMALL_CLIP = "ViT-S-32"  # the cheapest open_clip ViT on a CPU; the code path is the same as ViT-B-16's


def literal_soft_wpmi(p: torch.Tensor, q: torch.Tensor, a=10.0, top_k=100, p_start=0.998, p_end=0.97, lam=1.0,
                      eps=1e-7) -> torch.Tensor:
    """METHOD.md step 1b written out one neuron, one class and one rank at a time (float64)."""
    m, c = p.shape
    n = q.shape[1]
    k = min(top_k, m)
    s = torch.softmax(a * p.double(), dim=1)
    lmat = torch.zeros(n, c, dtype=torch.float64)
    for j in range(n):
        order = sorted(range(m), key=lambda i: -float(q[i, j]))[:k]
        for cc in range(c):
            total = 0.0
            for r, idx in enumerate(order):
                pr = p_start - (r / k) * (p_start - p_end)
                total += math.log(1 + pr * (float(s[idx, cc]) - 1) + eps)
            lmat[j, cc] = total
    ld = torch.logsumexp(lmat, dim=0) - math.log(n)
    return lmat - lam * ld


@pytest.mark.parametrize("m", [150, 30])  # K = 100 < M, and K = M
def test_soft_wpmi_matches_literal(m):
    g = torch.Generator().manual_seed(m)
    p = torch.randn(m, 6, generator=g) * 0.3
    q = torch.randn(m, 9, generator=g)
    top = cd._TopK(100)
    for i in range(0, m, 16):  # streamed in batches, as activation_topk does
        top.add(q[i:i + 16], i)
    got = cd.soft_wpmi(p, top.index, chunk_elems=200)  # several neuron chunks
    want = literal_soft_wpmi(p, q)
    assert got.shape == (9, 6)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4), float((got.double() - want).abs().max())
    assert top.index.shape == (min(100, m), 9)


def test_activation_topk_uses_spatial_means(demo):
    data = load_dataset("digits", "train", 37)
    idx = cd.activation_topk(demo.model, "block3", data, 10, batch_size=8, show_progress=False)
    with torch.no_grad(), capture(demo.model, "block3") as box:
        demo.model(data.all().x)
    q = box["out"].mean((2, 3))
    want = torch.topk(q, 10, dim=0).indices
    assert torch.equal(idx, want)


def test_tensor_preprocess_follows_clips_pil_pipeline():
    import open_clip
    from PIL import Image

    _, _, pre = open_clip.create_model_and_transforms(SMALL_CLIP, pretrained=None)
    fn, text = cd.tensor_preprocess(pre)
    assert "Normalize" in text and "Resize" in text
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    ours = fn(x.float() / 255)
    ref = torch.stack([pre(Image.fromarray(xi.permute(1, 2, 0).numpy())) for xi in x])
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    assert float((ours - ref).abs().mean()) < 0.02  # PIL rounds to 8 bits after resizing; we do not
    grey = fn(torch.rand(2, 1, 8, 8))
    assert grey.shape == (2, 3, 224, 224)


def test_prompts_template():
    assert cd.prompts(["aquarium_fish", "cat"]) == ["aquarium fish", "cat"]
    assert cd.prompts(["cat"], "a photo of a {}") == ["a photo of a cat"]
    with pytest.raises(IgdError, match="template"):
        cd.prompts(["cat"], "no slot")


def test_openai_weights_offline_fail_fast(monkeypatch):
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "timm/vit_base_patch16_clip_224.openai"
    if any(isinstance(try_to_load_from_cache(repo, f), str)
           for f in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")):
        pytest.skip("the OpenAI ViT-B-16 weights are cached on this machine")
    # the error must come from igd's own cache check, before open_clip asks the hub (and waits for time-outs)
    monkeypatch.setattr(open_clip, "create_model_and_transforms",
                        lambda *a, **k: pytest.fail("open_clip was asked to download while offline"))
    with pytest.raises(IgdError) as info:
        cd.load_clip("ViT-B-16", "openai", torch.device("cpu"))
    msg = str(info.value)
    assert "--clip-pretrained" in msg and "open_clip_pytorch_model.bin" in msg and repo in msg and "\n" not in msg
    with pytest.raises(IgdError, match="unknown to open_clip"):
        cd.load_clip("ViT-Nope", "none", torch.device("cpu"))
    with pytest.raises(IgdError, match="not a tag"):
        cd.load_clip("ViT-B-16", "no-such-tag", torch.device("cpu"))
    with pytest.raises(IgdError, match="no such file"):
        cd.load_clip("ViT-B-16", "/nonexistent/weights.bin", torch.device("cpu"))


def test_rank_cd_ir_caches_clip_and_reuses_it(cli, igd_home, tmp_path, monkeypatch):
    cache = tmp_path / "clip.safetensors"
    calls = []
    real = cd.load_clip

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(cd, "load_clip", counting)
    common = ["--model", "demo", "--method", "cd-ir", "--clip-model", SMALL_CLIP, "--clip-pretrained", "none",
              "--clip-cache", cache, "--batch-size", "8", "--json"]
    r = cli("rank", *common, "--n-probe", "12", "--out", tmp_path / "a.safetensors")
    assert r.code == 0, r.err
    j = r.json()
    assert j["shape"] == [128, 10] and j["n_probe"] == 12 and j["clip_cache_reused"] is False and len(calls) == 1
    art = load_artifact(cache, kind="clip-cache")
    img, txt = art["image_embeddings"], art["text_embeddings"]
    assert img.shape[0] == 12 and txt.shape[0] == 10 and img.shape[1] == txt.shape[1]
    assert torch.allclose(img.norm(dim=1), torch.ones(12), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(10), atol=1e-5)
    assert art.meta["clip_model"] == SMALL_CLIP and art.meta["n"] == 12 and art.meta["split"] == "train"
    # the embeddings are in probe order: image 3 alone gives row 3
    single = real(SMALL_CLIP, "none", torch.device("cpu"))
    with torch.no_grad():
        e = single.model.encode_image(single.preprocess(load_dataset("digits", "train", 4).get(3, 4).x)).float()
    assert torch.allclose(e[0] / e[0].norm(), img[3], atol=1e-4)

    # another layer, and a smaller probe set (a prefix of the cached one): CLIP must not run again
    monkeypatch.setattr(cd, "load_clip", lambda *a, **k: pytest.fail("CLIP ran although the cache matches"))
    r2 = cli("rank", *common, "--n-probe", "12", "--layer", "block2", "--out", tmp_path / "b.safetensors")
    assert r2.code == 0, r2.err
    assert r2.json()["clip_cache_reused"] is True and r2.json()["shape"] == [64, 10]
    r3 = cli("rank", *common, "--n-probe", "7", "--out", tmp_path / "c.safetensors")
    assert r3.code == 0 and r3.json()["clip_cache_reused"] is True
    # the result equals soft-WPMI computed from the cached embeddings and the layer's activations
    imp = load_artifact(tmp_path / "c.safetensors", kind="importance")
    data = load_dataset("digits", "train", 7)
    from igd_cli.models import load_model

    model = load_model("demo").model
    with torch.no_grad(), capture(model, "block3") as box:
        model(data.all().x)
    want = literal_soft_wpmi(img[:7] @ txt.T, box["out"].mean((2, 3)))
    assert torch.allclose(imp["importance"].double(), want, rtol=1e-4, atol=1e-3)
    assert imp.meta["params"]["clip_model"] == SMALL_CLIP and imp.meta["params"]["top_k"] == 7

    # other prompts do not match the cache: CLIP runs (and here it is refused)
    monkeypatch.setattr(cd, "load_clip", lambda *a, **k: (_ for _ in ()).throw(IgdError("clip was called")))
    r4 = cli("rank", *common, "--n-probe", "7", "--clip-template", "a photo of a {}", "--out", tmp_path / "d.safetensors")
    assert r4.code == 2 and "clip was called" in r4.err


def test_cd_ir_shard_rows_equal_full(demo, tmp_path):
    data = load_dataset("digits", "train", 10)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    want = cd.cache_meta("fake", "none", data, "{}")
    from igd_cli.artifacts import save_artifact

    path = tmp_path / "cache.safetensors"
    save_artifact(path, "clip-cache", {"image_embeddings": img, "text_embeddings": txt}, want)
    full = cd.cd_ir(demo.model, "block3", data, clip_model="fake", clip_pretrained="none", cache=path,
                    show_progress=False)
    part = cd.cd_ir(demo.model, "block3", data, neurons=(30, 70), clip_model="fake", clip_pretrained="none",
                    cache=path, show_progress=False)
    assert full.cache_reused and part.cache_reused
    assert torch.equal(part.importance, full.importance[30:70])
    assert np.isfinite(full.importance.numpy()).all()
