"""The same question gets the same answer: however a job is cut (batch size, shard split, skipping,
order), whatever was cached, and nothing stale or foreign is ever reused.

References are computed independently: pyautoattack run on one image at a time under the image's seed, and
fresh runs in fresh folders.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.square import SquareAttack
from safetensors.torch import save_file

from igd_cli.artifacts import intact, load_artifact, read_metadata, save_artifact
from igd_cli.attacks import make_attack, predict, run_attack
from igd_cli.attacks.base import image_seed
from igd_cli.data import DIGITS_CLASSES, load_dataset
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.errors import IgdError

from .conftest import digits_safetensors


@pytest.fixture(scope="module")
def images(demo):
    b = load_dataset("digits", "test", 16).all()
    return b.x, b.y, b.index


# --- per-image randomness: AutoAttack and Square equal pyautoattack on each image alone ------------------

def _pyautoattack_aa(model, x, y, seed, eps, norm, steps, queries):
    """pyautoattack's standard AutoAttack, built as its __init__ builds it, with a small budget."""
    aa = AutoAttack(model, norm=norm, eps=eps, seed=seed, version="standard", device="cpu")
    aa.verbose = False
    aa.apgd = APGDAttack(model, n_restarts=1, n_iter=steps, verbose=False, eps=eps, norm=norm, eot_iter=1, rho=.75,
                         seed=seed, device="cpu", logger=aa.logger)
    aa.apgd_targeted = APGDAttack_targeted(model, n_restarts=1, n_iter=steps, verbose=False, eps=eps, norm=norm,
                                           eot_iter=1, rho=.75, seed=seed, device="cpu", logger=aa.logger,
                                           n_target_classes=9)
    aa.fab.n_iter = steps
    aa.square.n_queries = queries
    return aa.run_standard_evaluation(x, y, batch_size=len(x))[0]


def test_autoattack_is_pyautoattack_on_each_image_alone(demo, images):
    """Every image gets the point pyautoattack's AutoAttack gives it when attacked alone under its own seed, in a
    batch of 16 and in batches of 5: the batch no longer decides its random starts or Square's windows."""
    x, y, idx = images
    atk = make_attack("aa", demo.model, eps=0.2, seed=3, num_classes=10, steps=5, queries=40)
    whole = atk(x, y, idx)
    parts = torch.cat([atk(x[i:i + 5], y[i:i + 5], idx[i:i + 5]) for i in range(0, len(x), 5)])
    fooled = predict(demo.model, whole) != y
    assert fooled.any() and (~fooled).any()
    for i in range(len(x)):
        ref = _pyautoattack_aa(demo.model, x[i:i + 1], y[i:i + 1], image_seed(3, int(idx[i])), 0.2, "Linf", 5, 40)
        assert torch.equal(whole[i:i + 1], ref), i
    assert torch.allclose(whole, parts, atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.35), ("L2", 1.5)])
def test_square_is_pyautoattack_on_each_image_alone(demo, images, norm, eps):
    x, y, idx = images
    x, y, idx = x[:8], y[:8], idx[:8]
    ours = make_attack("square", demo.model, eps=eps, norm=norm, seed=1, queries=30)(x, y, idx)
    assert (predict(demo.model, ours) != y).any()  # Square returns the clean image where it fails
    for i in range(len(x)):
        ref = SquareAttack(demo.model, p_init=.8, n_queries=30, eps=eps, norm=norm, n_restarts=1,
                           seed=image_seed(1, int(idx[i])), verbose=False, device="cpu",
                           resc_schedule=False).perturb(x[i:i + 1], y[i:i + 1])
        assert torch.allclose(ours[i:i + 1], ref, atol=1e-7), i


# --- every attack, on a randomized defence: batch size, order and shards change no point ---------------------

@pytest.fixture(scope="module")
def smoothed(demo):
    """The demo defence with noise strong enough to flip predictions (LO-IR-like ranking from a fixed matrix)."""
    g = torch.Generator().manual_seed(0)
    mask = topk_mask(torch.rand(128, 10, generator=g), 40)
    return IGDefense(demo.model, "block3", mask, sigma=0.1)


ATTACK_BUDGETS = {"aa": dict(steps=2, queries=15), "aa-rand": dict(steps=2, eot_iter=2),
                  "square": dict(queries=15), "rays": dict(queries=40), "apgd-ce": dict(steps=3),
                  "apgd-eot": dict(steps=2, eot_iter=2), "apgd-t-dlr": dict(steps=2, restarts=1),
                  "fab-t": dict(steps=3), "pgd": dict(steps=3)}


@pytest.mark.parametrize("name", list(ATTACK_BUDGETS))
def test_every_attack_gives_each_image_its_point_in_any_batch(smoothed, name):
    data = load_dataset("digits", "test", 10)
    atk = make_attack(name, smoothed, eps=0.2, seed=0, num_classes=10, **ATTACK_BUDGETS[name])
    whole = run_attack(atk, data, batch_size=10, show_progress=False)
    perm = torch.tensor([7, 2, 9, 0, 5, 1, 8, 3, 6, 4])
    shuffled = run_attack(atk, data, batch_size=3, positions=perm, show_progress=False)
    back = shuffled.x_adv[torch.argsort(shuffled.index)]
    assert torch.allclose(whole.x_adv, back, atol=1e-6), (whole.x_adv - back).abs().amax()
    if name in ("rays", "aa", "square"):  # batches of one, for the attacks whose queries used to be shared
        ones = run_attack(atk, data, batch_size=1, show_progress=False)
        assert torch.allclose(whole.x_adv, ones.x_adv, atol=1e-6)


def test_rays_queries_are_keyed_by_the_attacked_image(smoothed):
    """RayS's first queries are the same box corner for every image; the noise of each must be the attacked
    image's own: an image's result does not change when another image joins its batch."""
    data = load_dataset("digits", "test", 6)
    atk = make_attack("rays", smoothed, eps=0.2, seed=0, queries=30)
    alone = run_attack(atk, data, batch_size=1, positions=torch.tensor([3]), show_progress=False)
    together = run_attack(atk, data, batch_size=6, show_progress=False)
    assert torch.allclose(alone.x_adv[0], together.x_adv[3], atol=1e-6)


# --- figures and per-image decisions, not points: randomness keyed by the image, never by a float's last bits -----

def _decisions(res):
    """Every figure and every per-image, per-draw decision of an evaluation."""
    j = res.to_json()
    bits = {"clean": res.clean_defended, **{f"def:{k}": v for k, v in res.defended.items()},
            **{f"base:{k}": v for k, v in res.base.items()}}
    return {k: j[k] for k in ("clean_accuracy", "clean_accuracy_std", "robust_accuracy", "robust_accuracy_std",
                              "worst_case", "worst_case_std")}, bits


def _evaluate(defense, data, attack, batch_size, **budget):
    from igd_cli.common import open_target
    from igd_cli.evaluate import Budgets, evaluate_defense

    target = open_target("demo", None, None, device="cpu")
    return evaluate_defense(target, defense, data, attack=attack, workdir=None, eps=0.2, seed=0, draws=3,
                            batch_size=batch_size, budgets=Budgets(**budget), show_progress=False, base=False)


SAME_ANSWER_BUDGETS = {**ATTACK_BUDGETS, "fab-t": dict(steps=3), "adaptive": dict(steps=2, eot_iter=2),
                       "apgd-cw": dict(steps=3), "fgsm": {}}


@pytest.mark.parametrize("name", list(SAME_ANSWER_BUDGETS))
def test_every_attack_gives_the_same_figures_and_decisions_at_any_batch_size(demo, name):
    """Batch 40 against batch 5 on a defence whose noise flips predictions: every figure and every image's
    decision in every draw equal. With noise keyed by the bytes of each queried point, FAB-T moved with the batch
    size (the demo's logits are not bitwise equal between batch 40 and 5, FAB's next point uses their values, and
    its next query drew unrelated noise): 71.67 vs 72.50 %."""
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(1)), 40)
    d = IGDefense(demo.model, "block3", mask, sigma=0.1)
    data = load_dataset("digits", "test", 40)
    figures, bits = _decisions(_evaluate(d, data, name, 40, **SAME_ANSWER_BUDGETS[name]))
    figures5, bits5 = _decisions(_evaluate(d, data, name, 5, **SAME_ANSWER_BUDGETS[name]))
    assert figures == figures5
    assert bits.keys() == bits5.keys() and all(torch.equal(bits[k], bits5[k]) for k in bits)
    assert 0 < figures["robust_accuracy"][name] < 1  # the attack breaks some images, not all: the test can fail


def test_rays_decisions_do_not_depend_on_the_batch_at_large_noise(demo):
    """σ = 0.5 with a top-2 mask, where the noise decides often: RayS's figures and per-image decisions are the
    same at batch 16, 5 and 1. Its first queries are one box corner for every image; they are declared as each
    image's own (without that, noise keyed by the queried point moved 2-3 of 16 images with the batch)."""
    d = IGDefense(demo.model, "block3", topk_mask(demo.model.linear.weight.detach().t(), 2), sigma=0.5)
    data = load_dataset("digits", "test", 16)
    runs = {bs: _decisions(_evaluate(d, data, "rays", bs, queries=60)) for bs in (16, 5, 1)}
    for bs in (5, 1):
        assert runs[bs][0] == runs[16][0]
        assert all(torch.equal(runs[bs][1][k], runs[16][1][k]) for k in runs[16][1])
    bits = runs[16][1]["def:rays"]
    assert bool((bits.any(0) & ~bits.all(0)).any())  # some images right in some draws only: noise decides


def test_duplicate_images_get_their_own_draws_in_any_batch(demo, tmp_path):
    """The first 30 test digits twice in one tensor file: each copy is its own image (its position), so the
    figures do not depend on whether its twin shares its batch (the old occurrence counter gave the second
    copy in a batch the first one's next draw: 95.67 ± 2.24 % at batch 60, ± 1.90 at batch 30 and 7)."""
    from igd_cli.data import load_dataset as load

    b = load("digits", "test", 30).all()
    path = tmp_path / "twice.safetensors"
    x = (torch.cat([b.x, b.x]) * 255).round().to(torch.uint8)
    save_file({"x": x, "y": torch.cat([b.y, b.y])}, str(path), metadata={"classes": json.dumps(DIGITS_CLASSES)})
    data = load(str(path), "test", None)
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(2)), 40)
    d = IGDefense(demo.model, "block3", mask, sigma=0.3)
    runs = {bs: _decisions(_evaluate(d, data, "none", bs)) for bs in (60, 30, 7)}
    for bs in (30, 7):
        assert runs[bs][0] == runs[60][0]
        assert torch.equal(runs[bs][1]["clean"], runs[60][1]["clean"])
    clean = runs[60][1]["clean"]
    assert not torch.equal(clean[:, :30], clean[:, 30:])  # the twins draw their own noise: the test can fail


# --- artifacts: content, not paths; corruption is refused --------------------------------------------------

def test_a_flipped_bit_is_refused_not_reused(tmp_path):
    path = save_artifact(tmp_path / "imp.safetensors", "importance", {"importance": torch.arange(12.).view(4, 3)},
                         {"layer": "x"})
    assert intact(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10  # a byte of the tensor data; the header stays intact
    path.write_bytes(bytes(raw))
    assert read_metadata(path)["layer"] == "x"  # the header still reads
    assert not intact(path)
    with pytest.raises(IgdError, match="corrupted"):
        load_artifact(path)


def test_data_files_are_identified_by_content_not_path(tmp_path):
    a = digits_safetensors(tmp_path, "test", 30)
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    da, dc = load_dataset(str(a), "test", 20), load_dataset(str(copy), "test", 20)
    assert da.identity() == dc.identity()
    b = load_dataset("digits", "test", 30).all()
    save_file({"x": (b.x.flip(0) * 255).round().to(torch.uint8), "y": b.y.flip(0)}, str(a),
              metadata={"classes": json.dumps(DIGITS_CLASSES)})  # rewritten in place, same name
    assert load_dataset(str(a), "test", 20).identity() != dc.identity()


def test_architecture_code_is_part_of_the_fingerprint(tmp_path):
    """The same weights under an --arch whose forward computes something else are another model."""
    from igd_cli.models import load_model

    src = ("import torch, torch.nn as nn\n"
           "class Net(nn.Module):\n"
           "    def __init__(self, num_classes=10):\n"
           "        super().__init__()\n"
           "        self.conv = nn.Conv2d(1, 4, 3)\n"
           "        self.fc = nn.Linear(4, num_classes)\n"
           "    def forward(self, x):\n"
           "        return self.fc(self.conv(x {op}).mean((2, 3)))\n")
    (tmp_path / "a.py").write_text(src.format(op="- 0.5"))
    (tmp_path / "b.py").write_text(src.format(op="* 2.0"))
    torch.manual_seed(0)
    import importlib.util

    spec = importlib.util.spec_from_file_location("a_net", tmp_path / "a.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.Net().state_dict(), tmp_path / "w.pt")
    fa = load_model(str(tmp_path / "w.pt"), arch=f"{tmp_path / 'a.py'}:Net").fingerprint
    fb = load_model(str(tmp_path / "w.pt"), arch=f"{tmp_path / 'b.py'}:Net").fingerprint
    assert fa != fb
    assert fa == load_model(str(tmp_path / "w.pt"), arch=f"{tmp_path / 'a.py'}:Net").fingerprint



def test_fingerprint_does_not_depend_on_where_the_files_lie(tmp_path):
    """The same two source files in folders that sort the other way round give the same fingerprint (before,
    the files were hashed in the order of their paths, and a clone in another folder made another model)."""
    from igd_cli.models import fingerprint

    head = ("import torch.nn as nn\n"
            "class {name}(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.fc = nn.Linear(3, 3)\n"
            "    def forward(self, x):\n"
            "        return self.fc(x) {op}\n")
    import importlib.util

    def build(where_inner: str, where_outer: str):
        for d, name, op in ((where_inner, "Inner", "+ 1"), (where_outer, "Outer", "* 2")):
            (tmp_path / d).mkdir(exist_ok=True)
            (tmp_path / d / f"{name.lower()}.py").write_text(head.format(name=name, op=op))
        mods = []
        for d, name in ((where_inner, "inner"), (where_outer, "outer")):
            spec = importlib.util.spec_from_file_location(f"m_{d}_{name}", tmp_path / d / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mods.append(mod)
        torch.manual_seed(0)
        outer = mods[1].Outer()
        outer.inner = mods[0].Inner()
        return outer

    a = build("a", "z")  # inner.py's path sorts first
    b = build("zz", "aa")  # outer.py's path sorts first
    assert fingerprint(a) == fingerprint(b)

# --- the pipeline: identities and the run-folder lock --------------------------------------------------------

TINY = ["--n-probe", "80", "--n-examples", "12", "--attack", "aa", "--steps", "2", "--queries", "10",
        "--batch-size", "64", "--draws", "2", "--json"]


def test_pipeline_recomputes_when_the_images_change_in_place(tmp_path, cli):
    train = digits_safetensors(tmp_path, "train", 80)
    test = digits_safetensors(tmp_path, "test", 40)
    common = ["pipeline", "--dataset", test, "--probe-dataset", train, "--eps", "0.2", *TINY]
    first = cli(*common, "--out", tmp_path / "run")
    assert first.code == 0, first.err
    # the evaluation file rewritten in place: same name, other images (the first 12 are others now)
    b = load_dataset("digits", "test", 40).all()
    save_file({"x": (b.x.flip(0) * 255).round().to(torch.uint8), "y": b.y.flip(0)}, str(test),
              metadata={"classes": json.dumps(DIGITS_CLASSES)})
    again = cli(*common, "--out", tmp_path / "run")
    fresh = cli(*common, "--out", tmp_path / "fresh")
    assert again.code == 0 and fresh.code == 0, again.err + fresh.err
    a, f = again.json(), fresh.json()
    assert a["stages"]["rank"] == "reused"  # the probe file did not change
    assert a["stages"]["calibrate"] == "computed" and a["stages"]["defend-eval"] == "computed"
    for key in ("k", "clean_accuracy", "base_clean_accuracy", "worst_case", "base_worst_case", "robust_accuracy"):
        assert a[key] == f[key], key


def test_pipeline_passes_the_threat_model_and_keys_by_it(tmp_path, cli):
    base = ["pipeline", "--eps", "0.5", *TINY, "--out", tmp_path / "run"]
    linf = cli(*base)
    l2 = cli(*base, "--threat-model", "L2")
    assert linf.code == 0 and l2.code == 0, linf.err + l2.err
    assert l2.json()["stages"]["transfer"] == "computed" and l2.json()["stages"]["defend-eval"] == "computed"
    sets = [read_metadata(p) for p in (tmp_path / "run" / "adv").glob("*.safetensors")]
    assert {m["norm"] for m in sets} == {"Linf", "L2"}


def _hold_lock(folder, ready, release):
    from igd_cli.pipeline import run_lock

    with run_lock(folder):
        ready.set()
        release.wait(60)


def test_a_second_process_on_one_run_folder_fails_in_one_line_past_lock_wait(tmp_path, cli):
    out = tmp_path / "run"
    out.mkdir()
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(out, ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        r = cli("pipeline", *TINY, "--out", out, "--lock-wait", "0")
        assert r.code == 2 and f"in use by igd pipeline (pid {holder.pid} on" in r.err
        assert len(r.err.strip().splitlines()) == 1
    finally:
        release.set()
        holder.join(60)
    assert cli("pipeline", *TINY, "--out", out).code == 0  # free again once the holder ended


def test_defend_eval_reads_the_mask_file_once_and_keys_sets_by_its_content(tmp_path):
    """The mask artifact is opened once (its tensors, metadata and sha256 from the same bytes): the evaluation
    still runs after the file is gone, and a moved mask reuses the sets made with it (no path in the key)."""
    from igd_cli.common import open_target
    from igd_cli.defense import load_defense, save_mask
    from igd_cli.evaluate import defend_eval

    target = open_target("demo", None, None)
    imp_path = save_artifact(tmp_path / "imp.safetensors", "importance",
                             {"importance": torch.rand(128, 10, generator=torch.Generator().manual_seed(0))},
                             {"method": "random", "data": {"dataset": "digits", "split": "train", "n": 1}})
    mask = save_mask(tmp_path / "mask.safetensors", target, "block3",
                     topk_mask(load_artifact(imp_path)["importance"], 64), k=64, importance_path=imp_path,
                     importance_meta={"method": "random"}, defense={"tau": 0.01, "sigma": 0.1, "n_smooth": 1,
                                                                    "rs": True})
    data = load_dataset("digits", "test", 6)
    d = load_defense(target, mask)
    moved = tmp_path / "moved.safetensors"
    os.replace(mask, moved)  # the file is gone from where the defence was loaded
    ran = []
    kw = dict(attack="pgd", eps=0.2, workdir=tmp_path / "wd", show_progress=False)
    import igd_cli.evaluate as ev

    real = ev.run_attack

    def counting(*a, **k):
        ran.append(1)
        return real(*a, **k)

    ev.run_attack = counting
    try:
        _, first = defend_eval(target, d, mask, data, **kw)
        _, again = defend_eval(target, load_defense(target, moved), moved, data, **kw)
    finally:
        ev.run_attack = real
    assert len(ran) == 2  # base and defended sets made once, reused with the moved mask
    assert first["robust_accuracy"] == again["robust_accuracy"]
