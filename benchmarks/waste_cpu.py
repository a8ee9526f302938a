"""Work not worth doing on the hot paths: forwards per image, counted exactly, and wall time.

The fix measured: a clean-only evaluation of a randomized defence (``igd defend-eval --attack none``) used to
classify every image 2R times (R draws to "select" among one candidate, R to score it); it now makes the R final
draws. "before" is the old code path run through the library (``classify`` of all 2R rows, as the old
``Evaluator.clean`` did, plus the base model's one row), "after" is ``evaluate_defense(attack="none")``; both in
the same run, interleaved over ``--rounds`` rounds (median of the per-round ratios), and their figures are checked
equal bit for bit (every per-draw count, majority and all-draws count).

Counted on the other hot paths, to show where the passes go (no waste found there, see docs/performance.md):
the defended forward, calibrate-k's feature pass and each k of its search, repeated-draw scoring of an attack's
set, and LO-IR. A "stem pass" is one image through the model's first weighted layer, a "classifier pass" one
image through its last: a base forward is one of each. The defences' one-time check of their fx split (8 images)
is made before counting; LO-IR's counts include its one-time checks on the first batch.

    python benchmarks/waste_cpu.py [--models demo resnet18] [--draws 5] [--rounds 3] [--out benchmarks/results/waste-cpu.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _data, also when imported as a module

from _data import add_data_dir, data_file, write_results  # noqa: E402
from igd_cli import noise  # noqa: E402
from igd_cli.calibrate import calibrate_k  # noqa: E402
from igd_cli.common import open_target  # noqa: E402
from igd_cli.data import load_dataset  # noqa: E402
from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.evaluate import evaluate_defense  # noqa: E402
from igd_cli.layers import layer_output_shape  # noqa: E402
from igd_cli.ranking.lo_ir import lo_ir  # noqa: E402
from igd_cli.scoring import Score, classify, final_rows  # noqa: E402



class Passes:
    """Images through a module (forward pre-hook), while inside ``with``."""

    def __init__(self, module: nn.Module):
        self.module, self.images = module, 0

    def __enter__(self):
        self.images = 0
        self.handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def _hook(self, _m, args):
        self.images += args[0].shape[0]

    def __exit__(self, *exc):
        self.handle.remove()


def weighted(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]


def setup(name: str, n: int, data_dir: Path | None = None):
    if name == "demo":
        target = open_target("demo", None, None, "Linf", "cpu")
        data, layer, sigma = target.data("test", n), "block3", target.loaded.eps / 2
    else:
        import pyautoattack

        path = Path(pyautoattack.__file__).parent / "examples" / "model_test.pt"
        cifar = data_file("cifar10-test-846.safetensors", data_dir)  # the ResNet-18 row needs real CIFAR-10
        target = open_target(str(path), "resnet18", str(cifar), "Linf", "cpu")
        data, layer, sigma = load_dataset(str(cifar), "test", n), "layer4", 4 / 255
    model = target.model.eval()
    n_neurons = layer_output_shape(model, layer, tuple(data.get(0, 1).x.shape[1:]))[0]
    imp = torch.rand(n_neurons, target.loaded.num_classes, generator=torch.Generator().manual_seed(0))
    defense = IGDefense(model, layer, topk_mask(imp, max(1, n_neurons // 4)), sigma=sigma, seed=0)
    return target, data, defense, imp, layer


def clean_before(target, defense, data, draws, batch_size):
    """The old clean-only path: the base model's one row and all 2R rows of the defence (``Evaluator.clean``)."""
    x, y = data.all().x, data.all().y
    base = classify(target.model, x, y, 1, seed=0, batch_size=batch_size)
    bits = classify(defense, x, y, 2 * draws, seed=0, batch_size=batch_size)
    return Score.of(final_rows(base)), Score.of(final_rows(bits))


def clean_after(target, defense, data, draws, batch_size):
    res = evaluate_defense(target, defense, data, attack="none", workdir=None, seed=0, batch_size=batch_size,
                           draws=draws, show_progress=False)
    j = res.to_json()["scores"]
    return Score.from_json(j["base"]["clean"]), Score.from_json(j["defended"]["clean"])


def warm_up(defense: IGDefense, data) -> None:
    """The defence's one-time check of its fx split (8 images), so that the counts are the per-image work."""
    with torch.no_grad():
        defense._ensure_checked(data.get(0, 8).x)


def per_image(count: int, n: int) -> float:
    return count / n


def measure(name: str, n: int, draws: int, rounds: int, batch_size: int, data_dir: Path | None = None) -> dict:
    target, data, defense, imp, layer = setup(name, n, data_dir)
    stem, head = weighted(target.model)[0], weighted(target.model)[-1]
    out: dict = {"model": name, "layer": layer, "n": n, "draws": draws, "batch_size": batch_size,
                 "sigma": defense.sigma, "n_smooth": defense.n_smooth, "fast_split": defense.split.fast}

    # -- the fix: exact counts (one run each), figures equal, wall time interleaved ---------------------------
    # every defence checks its fx split once, on its first 8 images: done here, outside the counts
    warm_up(defense, data)
    counts = {}
    scores = {}
    for label, fn in (("before", clean_before), ("after", clean_after)):
        q = Passes(defense)
        with q, Passes(stem) as s, Passes(head) as c:
            scores[label] = fn(target, defense, data, draws, batch_size)
        counts[label] = {"defended_queries_per_image": per_image(q.images, n),
                         "stem_passes_per_image": per_image(s.images, n),
                         "classifier_passes_per_image": per_image(c.images, n)}
    same = scores["before"] == scores["after"]
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(rounds):
        for label, fn in (("before", clean_before), ("after", clean_after)):
            t = time.perf_counter()
            fn(target, defense, data, draws, batch_size)
            times[label].append(time.perf_counter() - t)
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    out["clean_only_eval"] = {
        "counts": counts, "figures_equal": same,
        "figures": {"base": scores["after"][0].to_json(), "defended": scores["after"][1].to_json()},
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "median_seconds": {k: round(statistics.median(vs), 3) for k, vs in times.items()},
        "time_ratio_before_over_after": round(statistics.median(ratios), 3),
        "time_ratios": [round(r, 3) for r in ratios]}

    # -- the other hot paths: where the passes go ----------------------------------------------------------
    x, y = data.all().x, data.all().y
    other = {}
    with torch.no_grad(), Passes(stem) as s, Passes(head) as c:
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size]
            with noise.images(noise.image_keys(torch.arange(i, i + len(xb)), xb), noise.stream(0, "waste")):
                defense(xb)
    other["defended_forward"] = {"stem_passes_per_image": per_image(s.images, n),
                                 "classifier_passes_per_image": per_image(c.images, n)}
    base_only = IGDefense(target.model, layer, torch.ones_like(defense.mask), sigma=defense.sigma, seed=0)
    warm_up(base_only, data)
    with Passes(stem) as s, Passes(head) as c:
        cal = calibrate_k(base_only, imp, data, batch_size=batch_size)
    k_evals = len(cal.order)
    # pass 1 runs the stem (noisy copies + clean) and the classifier (noisy tail + base tail); every k of the
    # search then runs the tail alone
    pass1_classifier = 2 * defense.n_smooth if defense.rs else 1
    other["calibrate_k"] = {"k_evaluated": k_evals, "stem_passes_per_image": per_image(s.images, n),
                            "classifier_passes_per_image": per_image(c.images, n),
                            "classifier_passes_per_image_per_k":
                                (per_image(c.images, n) - pass1_classifier) / k_evals if k_evals else None}
    adv = (x + 0.01 * torch.sign(torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))).clamp(0, 1)
    with Passes(defense) as q:
        classify(defense, adv, y, 2 * draws, seed=0, batch_size=batch_size)
    other["scoring_one_attack_set"] = {"defended_queries_per_image": per_image(q.images, n)}
    with Passes(stem) as s, Passes(head) as c:
        res = lo_ir(target.model, layer, data, target.loaded.num_classes, batch_size=batch_size, show_progress=False)
    other["lo_ir"] = {"path": res.path, "stem_passes_per_image": per_image(s.images, n),
                      "classifier_passes_per_image": per_image(c.images, n)}
    out["other_paths"] = other
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "resnet18"], choices=["demo", "resnet18"])
    ap.add_argument("--n-demo", type=int, default=360)
    ap.add_argument("--n-resnet", type=int, default=64)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "waste-cpu.json"))
    add_data_dir(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = [measure(m, args.n_demo if m == "demo" else args.n_resnet, args.draws, args.rounds, args.batch_size,
                    args.data_dir)
            for m in args.models]
    result = {"benchmark": "waste_cpu", "rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "load_avg": list(os.getloadavg()),
              "command": " ".join(["python", "benchmarks/waste_cpu.py", *sys.argv[1:]])}
    write_results(args.out, result, args.data_dir)
    for r in rows:
        c = r["clean_only_eval"]
        print(f"{r['model']}: defended queries/image {c['counts']['before']['defended_queries_per_image']:g} -> "
              f"{c['counts']['after']['defended_queries_per_image']:g}, stem passes/image "
              f"{c['counts']['before']['stem_passes_per_image']:g} -> {c['counts']['after']['stem_passes_per_image']:g}, "
              f"time ratio before/after {c['time_ratio_before_over_after']} (rounds {c['time_ratios']}), "
              f"figures equal: {c['figures_equal']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
