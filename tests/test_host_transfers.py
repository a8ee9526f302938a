"""No stage moves data to the host inside its per-batch loop except where it writes results (issue 23, item 3).

Every call of ``Tensor.cpu/.item/.tolist/.numpy`` and every ``int(t)``/``float(t)``/``operator.index(t)`` of a
tensor made by igd's code is counted by the igd function that made it; each stage runs on the demo with 2 and
with 4 batches of the same size. A call site whose count grows with the batches is inside a per-batch loop (on a
GPU each such call waits for the device); it must be one of :data:`ALLOWED`, each with its reason. ``bool(t)`` is
not counted: it is control flow an algorithm needs (an attack's "is any image left?"), not data moved.

On the CPU every tensor is a host tensor, so a site that only reads host-side bookkeeping (positions, the data
set's labels) counts as well: those are listed as allowed with that reason.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import pytest
import torch

import igd_cli
from igd_cli.attacks import make_attack, run_attack
from igd_cli.calibrate import calibrate_k
from igd_cli.data import load_dataset
from igd_cli.defense import IGDefense, topk_mask
from igd_cli.ranking.lo_ir import lo_ir
from igd_cli.scoring import classify

from .noise_blocks import block

ROOT = os.path.dirname(os.path.abspath(igd_cli.__file__))
BS = 8
NAMES = ("cpu", "item", "tolist", "numpy", "__int__", "__float__", "__index__")

#: (file, function, call) -> why it may run once per batch
ALLOWED = {
    ("attacks/base.py", "run_attack", "cpu"): "writes the batch's adversarial points into the result (CPU)",
    ("attacks/base.py", "__call__", "cpu"): "the batch's positions: host bookkeeping, already on the CPU",
    ("attacks/base.py", "gather", "tolist"): "positions to read from the data set: host bookkeeping",
    ("attacks/base.py", "image_generators", "tolist"): "positions seeding the per-image CPU generators",
    ("calibrate.py", "__init__", "int"): "the batch's first/last position: host bookkeeping",
    ("ranking/lo_ir.py", "_check_labels", "int"): "checks the data set's labels on the CPU, before they move",
    # per-image CPU generators (the same draws on any device): the images still attacked pick their generators
    ("attacks/pgd.py", "perturb", "tolist"): "images still attacked pick their per-image CPU generators",
    ("attacks/apgd.py", "_run", "tolist"): "images still attacked pick their per-image CPU generators",
    ("attacks/square.py", "perturb_images", "tolist"): "images still attacked pick their per-image CPU generators",
    ("attacks/square.py", "_single_run", "tolist"): "images still attacked pick their per-image CPU generators",
}


@contextlib.contextmanager
def counting():
    """Counter of (file, function, call) over host transfers made by igd_cli's own frames."""
    counts: collections.Counter = collections.Counter()
    orig = {n: getattr(torch.Tensor, n) for n in NAMES}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            fr = sys._getframe(1)
            while fr is not None and not fr.f_code.co_filename.startswith(ROOT):
                fr = fr.f_back
            if fr is not None:
                rel = os.path.relpath(fr.f_code.co_filename, ROOT).replace(os.sep, "/")
                counts[(rel, fr.f_code.co_name, name.strip("_"))] += 1
            return fn(self, *args, **kwargs)
        return counted

    own = {n for n in NAMES if n in vars(torch.Tensor)}  # the others are inherited from torch._C.TensorBase
    for n, f in orig.items():
        setattr(torch.Tensor, n, wrap(n, f))
    try:
        yield counts
    finally:
        for n, f in orig.items():
            if n in own:
                setattr(torch.Tensor, n, f)
            else:
                delattr(torch.Tensor, n)


@pytest.fixture(scope="module")
def defended(demo):
    mask = topk_mask(torch.rand(128, 10, generator=torch.Generator().manual_seed(0)), 40)
    return IGDefense(demo.model, "block3", mask, sigma=0.2, tau=0.5, seed=1)


def _imp():
    return torch.rand(128, 10, generator=torch.Generator().manual_seed(1))


STAGES = {
    "scoring": lambda d, data: classify(d, data.all().x, data.all().y, 4, batch_size=BS),
    "scoring-final": lambda d, data: classify(d, data.all().x, data.all().y, 4, batch_size=BS, part="final"),
    "calibrate-k": lambda d, data: calibrate_k(d, _imp(), data, batch_size=BS),
    "calibrate-k-recompute": lambda d, data: calibrate_k(d, _imp(), data, batch_size=BS, max_cache_bytes=0),
    "lo-ir": lambda d, data: lo_ir(d.model, "block3", data, 10, batch_size=BS, show_progress=False),
    "lo-ir-batched-tail": lambda d, data: lo_ir(d.model, "block3", data, 10, batch_size=BS, path="batched-tail",
                                                neurons=(0, 8), show_progress=False),
    **{f"attack-{a}": (lambda a: lambda d, data: run_attack(
        make_attack(a, d, eps=0.1, seed=0, num_classes=10, strict=False, steps=2, restarts=1, queries=10,
                    eot_iter=2), data, batch_size=BS, show_progress=False))(a)
       for a in ("fgsm", "pgd", "apgd-ce", "rays", "square")},
}


def growth(stage, defended, counter=counting):
    """Per call site, how many more host transfers 4 batches make than 2."""
    counts = []
    for n_batches in (2, 4):
        data = load_dataset("digits", "test", n_batches * BS)
        with counter() as c:
            STAGES[stage](defended, data)
        counts.append(c)
    return {site: counts[1][site] - counts[0].get(site, 0) for site in counts[1]
            if counts[1][site] != counts[0].get(site, 0)}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_host_transfer_per_batch(defended, stage):
    grown = growth(stage, defended)
    offenders = {site: n for site, n in grown.items() if site not in ALLOWED}
    assert not offenders, f"host transfers inside the per-batch loop of {stage}: {offenders}"


def test_the_counter_sees_a_planted_transfer(defended, monkeypatch):
    """The check can fail: the old scoring loop (one ``.cpu()`` of the (B,) bits per batch and draw), compiled as
    code of ``igd_cli/scoring.py``, is reported with its count."""
    import igd_cli.scoring as scoring

    source = ("def planted_classify(model, x, y, rows, batch_size):\n"
              "    out = []\n"
              "    for i in range(0, len(x), batch_size):\n"
              "        for r in range(rows):\n"
              "            with noise.rows(torch.arange(i, min(i + batch_size, len(x)))):\n"
              "                out.append((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).cpu())\n"
              "    return out\n")
    namespace: dict = {"noise": igd_cli.noise, "torch": torch}
    exec(compile(source, scoring.__file__, "exec"), namespace)  # its frames are scoring.py's
    def planted(d, data):
        with block(data.all().x):
            return namespace["planted_classify"](d, data.all().x, data.all().y, 4, BS)

    monkeypatch.setitem(STAGES, "planted", planted)
    grown = growth("planted", defended)
    assert {site: n for site, n in grown.items() if site not in ALLOWED} == \
        {("scoring.py", "planted_classify", "cpu"): 2 * 4}
