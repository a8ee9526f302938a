"""--batch-size auto: the search on an injected allocation failure thresholded on the batch size (both ways: fits at
the cap; fails above some size), which errors count as "does not fit" (and that no other does), the failed trial's
memory released before the next try, the headroom against a measured peak, the CPU resolution to the command's
default, the real trial workloads (an attack stage's real attacks on every image), the choice in the results, and
that a searched batch changes no figure."""

from __future__ import annotations

import math

import pytest
import torch


class FakeDevice:
    """A workload that fails to allocate above ``limit`` images (None: never), raising what ``error(b)`` makes
    (torch's own out-of-memory error by default); records the sizes tried."""

    def __init__(self, limit: int | None, error=lambda b: torch.cuda.OutOfMemoryError(f"CUDA out of memory: {b} images")):
        self.limit = limit
        self.error = error
        self.tried: list[int] = []

    def __call__(self, b: int) -> None:
        self.tried.append(b)
        if self.limit is not None and b > self.limit:
            raise self.error(b)


#: what cuBLAS, cuDNN and the CUDA runtime raise when an allocation fails: RuntimeErrors, not OutOfMemoryError
LIBRARY_ALLOCATION_FAILURES = [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
]
#: RuntimeErrors of the same libraries that are not allocation failures: bugs to see, never a size to shrink
OTHER_RUNTIME_ERRORS = [
    "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`",
    "cuDNN error: CUDNN_STATUS_BAD_PARAM",
    "CUDA error: an illegal memory access was encountered",
    "mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)",
]


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

    with pytest.raises(IgdError, match="not even one image of this stage.s workload fits"):
        largest_batch(FakeDevice(0), cap=64, start=8)

    def broken(b):  # any other error is a bug to see, not a size to shrink
        raise ValueError("shape mismatch")
    with pytest.raises(ValueError, match="shape mismatch"):
        largest_batch(broken, cap=64)


@pytest.mark.parametrize("message", LIBRARY_ALLOCATION_FAILURES)
def test_a_library_allocation_failure_is_does_not_fit(message):
    from igd_cli.batching import is_oom, largest_batch

    assert is_oom(RuntimeError(message))
    dev = FakeDevice(37, error=lambda b: RuntimeError(message))
    assert largest_batch(dev, cap=128, start=16) == 37


@pytest.mark.parametrize("message", OTHER_RUNTIME_ERRORS)
def test_other_errors_propagate(message):
    from igd_cli.batching import is_oom, largest_batch

    assert not is_oom(RuntimeError(message))
    with pytest.raises(RuntimeError) as info:
        largest_batch(FakeDevice(37, error=lambda b: RuntimeError(message)), cap=128, start=16)
    assert str(info.value) == message
    assert is_oom(torch.OutOfMemoryError("x")) and not is_oom(ValueError("CUBLAS_STATUS_ALLOC_FAILED"))


def test_the_failed_trials_memory_is_released_before_the_next_try(monkeypatch):
    """The cache is emptied once the exception's traceback (which holds the trial's frames, and so its tensors) is
    gone: inside the ``except`` block the tensors would still be alive and nothing would go back to the device."""
    import weakref

    from igd_cli import batching

    alive_at_free: list[bool] = []
    trial_tensors: list[weakref.ref] = []

    def trial(b: int) -> None:
        activations = torch.empty(b, 16)  # what the trial holds when it runs out of memory
        trial_tensors.append(weakref.ref(activations))
        if b > 5:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {b} images")

    real_free = batching._free
    monkeypatch.setattr(batching, "_free", lambda: (alive_at_free.append(trial_tensors[-1]() is not None),
                                                    real_free()))
    assert batching.largest_batch(trial, cap=64, start=8) == 5
    assert alive_at_free and not any(alive_at_free), alive_at_free


class FakeMemory:
    """A memory probe: a trial of ``b`` images peaks at ``base + per_image * b`` bytes; ``budget`` bytes allowed."""

    def __init__(self, base: int, per_image: int, budget: int, available: int):
        self.base, self.per_image, self.budget, self.available = base, per_image, budget, available
        self.b = 0

    def start(self) -> None:
        pass

    def peak(self) -> int:
        return self.base + self.per_image * self.b


def test_auto_keeps_headroom_under_the_measured_peak(capsys):
    """The batch is the largest whose trial's peak stays within the budget (1 - HEADROOM of the available memory),
    not the largest that merely ran; the choice, its peak and the headroom go into the result."""
    from igd_cli.batching import HEADROOM, choose_batch_size

    mib = 2 ** 20
    available = 1000 * mib
    mem = FakeMemory(base=100 * mib, per_image=3 * mib, budget=int((1 - HEADROOM) * available), available=available)

    def trial(b: int) -> None:
        mem.b = b
        if mem.peak() > available:  # what a real device does: fails only past all of its memory
            raise torch.OutOfMemoryError("CUDA out of memory")

    choice = choose_batch_size("auto", default=128, device="cpu", cap=4096, try_batch=trial, what="x", search=True,
                               memory=mem)
    want = (mem.budget - mem.base) // mem.per_image  # 250: while 300 would have run
    assert choice.size == want == 250
    js = choice.to_json()
    assert js["batch_size"] == 250 and js["searched"] and js["peak_mb"] == 100 + 3 * 250
    assert js["available_mb"] == 1000 and js["headroom"] == pytest.approx(1 - 850 / 1000)
    assert js["headroom"] >= HEADROOM and js["headroom_kept"] == HEADROOM
    assert "300" in js["tried"] or any(int(b) > 250 for b in js["failed"])  # it went past and came back
    assert "250 images per batch fit for x" in capsys.readouterr().err


def test_resolve_on_cpu_is_the_default_and_says_so(capsys):
    from igd_cli.batching import choose_batch_size

    dev = FakeDevice(3)
    choice = choose_batch_size("auto", default=128, device="cpu", cap=500, try_batch=dev, what="x")
    assert choice.size == 128 and not choice.searched and choice.to_json()["peak_mb"] is None
    assert dev.tried == [] and "nothing to search on cpu" in capsys.readouterr().err
    fixed = choose_batch_size("64", default=128, device="cpu", cap=500, try_batch=dev, what="x")
    assert fixed.size == 64 and fixed.to_json() is None
    # the search itself (what CUDA runs), forced: capped by the images there are
    assert choose_batch_size("auto", default=128, device="cpu", cap=50, try_batch=FakeDevice(None), what="x",
                             search=True).size == 50
    assert choose_batch_size("auto", default=128, device="cpu", cap=500, try_batch=FakeDevice(300), what="x",
                             search=True).size == 300
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
    from igd_cli.batching import attack_trial, calibration_trial, defended_trial, largest_batch, rank_trial
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
    assert largest_batch(defended_trial(defense, digits_test), cap=16, start=4) == 16
    assert largest_batch(attack_trial([defense, demo.model], digits_test, "iw-wc", eps=0.1, num_classes=10),
                         cap=4, start=4) == 4


class Recording(torch.nn.Module):
    """The demo model, recording the batch of every forward under the attack part being built."""

    def __init__(self, model):
        super().__init__()
        self.model, self.part, self.calls = model, None, []

    def forward(self, x):
        self.calls.append((self.part, len(x), torch.is_grad_enabled() and x.requires_grad))
        return self.model(x)


def test_the_attack_trial_attacks_every_image_with_every_part(demo, digits_test, monkeypatch):
    """The trial labels each image with the model's prediction: every part (AutoAttack's APGD-T, FAB-T and Square
    attack only the images still classified right) attacks the whole batch, as on a robust model, even where the
    true labels are wrong for every image."""
    from igd_cli import attacks
    from igd_cli.batching import attack_parts, attack_trial

    class Wrong:  # every label wrong for the model: with true labels, AutoAttack's parts would attack nothing
        def __init__(self, data, model):
            self.data, self.model = data, model

        def __len__(self):
            return len(self.data)

        def get(self, i, j):
            b = self.data.get(i, j)
            with torch.no_grad():
                b.y = (self.model(b.x).argmax(1) + 1) % 10
            return b

    model = Recording(demo.model)
    real = attacks.make_attack

    def make(name, m, **kw):
        model.part = name
        return real(name, m, **kw)
    monkeypatch.setattr(attacks, "make_attack", make)
    attack_trial([model], Wrong(digits_test, demo.model), "aa", eps=0.1, num_classes=10)(8)
    parts = attack_parts("aa")
    assert parts == ("apgd-ce", "apgd-t-dlr", "fab-t", "square")
    for part in parts:
        calls = [(n, grad) for p, n, grad in model.calls if p == part]
        if part == "square":  # no gradients: its queries are forwards of the whole batch
            assert sum(n == 8 for n, _ in calls) >= 3, (part, calls)
        else:  # the gradient steps run on the whole batch
            assert (8, True) in calls, (part, calls)


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


def test_a_searched_batch_changes_no_figure_and_is_recorded(cli, tmp_path, igd_home, monkeypatch):
    """The search (forced here, as on CUDA) runs the real attacks on the defence before the evaluation: the
    figures equal those of the same batch given as a number, and the choice is in the result."""
    from igd_cli import batching

    imp, mask = tmp_path / "imp.safetensors", tmp_path / "mask.safetensors"
    assert cli("rank", "--method", "random", "--out", imp, "--device", "cpu").code == 0
    assert cli("calibrate-k", "--importance", imp, "--k", "16", "--sigma", "0.2", "--n-examples", "20", "--out",
               mask, "--device", "cpu").code == 0
    common = ["defend-eval", "--mask", mask, "--attack", "apgd-eot", "--steps", "2", "--eot-iter", "2",
              "--n-examples", "10", "--draws", "2", "--device", "cpu", "--json"]
    fixed = cli(*common, "--batch-size", "10", "--workdir", tmp_path / "fixed")
    assert fixed.code == 0, fixed.err
    monkeypatch.setattr(batching, "searchable", lambda device: True)
    auto = cli(*common, "--batch-size", "auto", "--workdir", tmp_path / "auto")
    assert auto.code == 0, auto.err
    a, f = auto.json(), fixed.json()
    assert a["auto_batch"]["searched"] and a["auto_batch"]["batch_size"] == a["batch_size"] == 10
    assert f["auto_batch"] is None
    for key in ("clean_accuracy", "clean_accuracy_std", "robust_accuracy", "robust_accuracy_std", "worst_case",
                "worst_case_std", "base_robust_accuracy", "scores"):
        assert a[key] == f[key], key
    r = cli("attack", "--attack", "fgsm", "--n-examples", "6", "--batch-size", "auto", "--out",
            tmp_path / "adv.safetensors", "--device", "cpu", "--json")
    assert r.code == 0 and r.json()["auto_batch"]["batch_size"] == 6 and r.json()["batch_size"] == 6


def test_the_help_states_the_headroom():
    from igd_cli.batching import HEADROOM
    from igd_cli.options import AutoBatchSize

    assert f"{HEADROOM:.0%} of the memory left free" in AutoBatchSize.__metadata__[0].help


def test_every_command_with_a_batch_size_takes_auto():
    import typer

    from igd_cli.cli import app
    from igd_cli.commands import register_all
    from igd_cli.reference import _commands

    register_all()
    found = []
    for full, cmd in _commands(typer.main.get_command(app), "igd"):
        for p in getattr(cmd, "params", []):
            if "--batch-size" in getattr(p, "opts", []):
                found.append(full)
                assert p.metavar == "N|auto", full  # a string, parsed by parse_batch_size
    assert {"igd attack", "igd audit", "igd analyze shift", "igd analyze ablation", "igd analyze sweep", "igd rank",
            "igd calibrate-k", "igd defend-eval", "igd pipeline"} <= set(found)
