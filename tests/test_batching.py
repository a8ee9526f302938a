"""--batch-size auto: the search on an injected out-of-memory thresholded on the batch size (both ways: fits at the
cap; OOM above some size), the CPU resolution to the command's default, the real trial workloads, the errors."""

from __future__ import annotations

import math

import pytest
import torch


class FakeDevice:
    """A workload that runs out of memory above ``limit`` images (None: never); records the sizes tried."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.tried: list[int] = []

    def __call__(self, b: int) -> None:
        self.tried.append(b)
        if self.limit is not None and b > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory: {b} images")


@pytest.mark.parametrize("limit", [1, 2, 3, 37, 64, 100, 127])
def test_search_finds_the_largest_batch_below_an_oom(limit):
    from igd_cli.batching import largest_batch

    dev = FakeDevice(limit)
    assert largest_batch(dev, cap=128, start=16) == limit
    assert any(b > limit for b in dev.tried)  # it did run into the OOM and came back
    assert len(dev.tried) <= 2 * math.ceil(math.log2(128)) + 2  # doubling + bisection, not a linear scan


@pytest.mark.parametrize("cap", [1, 5, 128, 1000])
def test_search_stops_at_the_cap_when_everything_fits(cap):
    from igd_cli.batching import largest_batch

    dev = FakeDevice(None)
    assert largest_batch(dev, cap=cap, start=16) == cap
    assert max(dev.tried) == cap  # never beyond the cap
    limited = FakeDevice(10_000)  # fits at the cap though an OOM exists far above it
    assert largest_batch(limited, cap=cap, start=16) == cap and max(limited.tried) == cap


def test_search_errors():
    from igd_cli.batching import largest_batch
    from igd_cli.errors import IgdError

    with pytest.raises(IgdError, match="not even one image fits"):
        largest_batch(FakeDevice(0), cap=64, start=8)

    def broken(b):  # any other error is a bug to see, not a size to shrink
        raise ValueError("shape mismatch")
    with pytest.raises(ValueError, match="shape mismatch"):
        largest_batch(broken, cap=64)


def test_resolve_on_cpu_is_the_default_and_says_so(capsys):
    from igd_cli.batching import resolve_batch_size

    dev = FakeDevice(3)
    assert resolve_batch_size("auto", default=128, device="cpu", cap=500, try_batch=dev, what="x") == 128
    assert dev.tried == [] and "nothing to search on cpu" in capsys.readouterr().err
    assert resolve_batch_size("64", default=128, device="cpu", cap=500, try_batch=dev, what="x") == 64
    # the search itself (what CUDA runs), forced: capped by the images there are
    assert resolve_batch_size("auto", default=128, device="cpu", cap=50, try_batch=FakeDevice(None), what="x",
                              search=True) == 50
    assert resolve_batch_size("auto", default=128, device="cpu", cap=500, try_batch=FakeDevice(300), what="x",
                              search=True) == 300
    assert "300 images per batch fit for x" in capsys.readouterr().err


def test_parse_batch_size():
    from igd_cli.batching import parse_batch_size
    from igd_cli.errors import IgdError

    assert parse_batch_size("AUTO") == "auto" and parse_batch_size("17") == 17 and parse_batch_size(5) == 5
    for bad in ("0", "-3", "abc", "1.5"):
        with pytest.raises(IgdError, match="--batch-size"):
            parse_batch_size(bad)


def test_the_real_trial_workloads_run(demo, digits_test):
    """Each stage's trial is a real batch of its workload (on the CPU nothing runs out of memory: fits at the cap)."""
    from igd_cli.batching import calibration_trial, defended_trial, largest_batch, rank_trial
    from igd_cli.data import load_dataset
    from igd_cli.defense import IGDefense
    from igd_cli.ranking import RankRequest

    probe = load_dataset("digits", "train", 64)
    req = RankRequest(model=demo.model, layer=demo.default_layer, n_neurons=128, num_classes=10, data=probe,
                      neurons=(0, 128), precision="bf16")
    for method in ("lo-ir", "cd-ir", "random"):
        assert largest_batch(rank_trial(req, method), cap=16, start=4) == 16
    req.lo_ir_path = "batched-tail"
    assert largest_batch(rank_trial(req, "lo-ir"), cap=16, start=4) == 16
    defense = IGDefense(demo.model, demo.default_layer, torch.ones(128, 10), tau=0.01, sigma=0.1, n_smooth=2,
                        rs=True, seed=0)
    assert largest_batch(calibration_trial(defense, digits_test, "bf16"), cap=16, start=4) == 16
    for grad in (False, True):
        assert largest_batch(defended_trial(defense, digits_test, grad=grad), cap=16, start=4) == 16


def test_cli_batch_size_auto_on_cpu(cli, tmp_path, igd_home):
    imp = tmp_path / "imp.safetensors"
    r = cli("rank", "--out", imp, "--device", "cpu", "--n-probe", "100", "--batch-size", "auto", "--json")
    assert r.code == 0, r.err
    assert r.json()["batch_size"] == 128 and "--batch-size auto: nothing to search on cpu" in r.err
    mask = tmp_path / "mask.safetensors"
    r = cli("calibrate-k", "--importance", imp, "--out", mask, "--device", "cpu", "--n-examples", "50",
            "--batch-size", "auto", "--json")
    assert r.code == 0 and r.json()["batch_size"] == 128
    r = cli("defend-eval", "--mask", mask, "--device", "cpu", "--n-examples", "20", "--batch-size", "auto", "--json")
    assert r.code == 0 and r.json()["batch_size"] == 128
    r = cli("rank", "--out", imp, "--device", "cpu", "--batch-size", "lots")
    assert r.code == 2 and r.err.strip().splitlines() == ["error: --batch-size lots: expected a whole number >= 1 or auto"]
