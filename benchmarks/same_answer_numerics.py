"""How far a figure moves when the arithmetic changes in the last bits: every attack's evaluation on the demo
defence run in float32 and in float64, per-image decisions compared.

A GPU changes the last bits of the logits with the batch size (other kernels), with TF32, and between devices.
igd keys every noise draw by the image and the query's ordinal, never by the bytes of a queried point, so such a
change moves a point by a last bit and never changes its noise; a decision can still flip where the point lies that
close to the boundary. float64 against float32 is this CPU's stand-in for that (a far larger change than a
reordered float32 sum): the images whose decisions differ are counted, and their margin is reported — the
defended model's logit margin ``z_y − max_{j≠y} z_j`` at the point that decided (the worse of the clean image and
the attack's point, mean over the final draws, in float64) — against the margin of the images that agree.

    python benchmarks/same_answer_numerics.py --n 40 --out benchmarks/results/same-answer-numerics-demo-cpu.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import write_results  # noqa: E402  (puts the repository on the path)

from igd_cli import noise  # noqa: E402
from igd_cli.common import open_target  # noqa: E402
from igd_cli.data import ImageSet, load_dataset  # noqa: E402
from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.evaluate import Budgets, evaluate_defense  # noqa: E402
from igd_cli.scoring import final_rows, score_stream  # noqa: E402

#: tiny budgets: the question is numerics, not strength
BUDGETS = {"aa": dict(steps=5, queries=50), "aa-rand": dict(steps=5, eot_iter=3), "apgd-ce": dict(steps=5),
           "apgd-cw": dict(steps=5), "apgd-t-dlr": dict(steps=3, restarts=1, eot_iter=3),
           "apgd-eot": dict(steps=5, eot_iter=3), "rays": dict(queries=100), "square": dict(queries=50),
           "pgd": dict(steps=5, eot_iter=3), "fgsm": dict(eot_iter=3), "fab-t": dict(steps=5),
           "adaptive": dict(steps=5, eot_iter=3)}
#: the two defences of the same-answer tests: noise that matters (σ = 0.1, 40 random neurons per class) and noise
#: that decides often (σ = 0.5, the head's top 2)
DEFENCES = {"random-k40-sigma0.1": (None, 40, 0.1), "weights-k2-sigma0.5": ("weights", 2, 0.5)}


def as_dtype(data: ImageSet, dtype: torch.dtype) -> ImageSet:
    """The same images in ``dtype`` (igd's data sets are float32)."""
    def get(i: int, j: int):
        b = data.get(i, j)
        return b.x.to(dtype), b.y

    return ImageSet(data.name, data.split, data.classes, len(data), get, source=data.source,
                    digest=data.source_digest)


def defence(model, kind, k, sigma) -> IGDefense:
    imp = model.linear.weight.detach().t() if kind == "weights" else \
        torch.rand(128, 10, generator=torch.Generator().manual_seed(1))
    return IGDefense(model, "block3", topk_mask(imp.float(), k).to(next(model.parameters()).dtype), sigma=sigma)


@torch.no_grad()
def margins(d: IGDefense, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, draws: int, seed: int
            ) -> torch.Tensor:
    """The defended logit margin of each point, mean over its final draws (the scoring stream's queries 0..R-1)."""
    out = torch.zeros(len(x), dtype=torch.float64)
    with noise.images(noise.image_keys(index, x), score_stream(seed)):
        for _ in range(draws):
            z = d(x).double()
            zy = z.gather(1, y[:, None])[:, 0]
            z.scatter_(1, y[:, None], -torch.inf)
            out += (zy - z.amax(1)) / draws
    return out


def run(n: int, draws: int, seed: int) -> dict:
    target = open_target("demo", None, None, device="cpu")
    data32 = load_dataset("digits", "test", n)
    model64 = copy.deepcopy(target.model).double().eval()
    target64 = copy.copy(target)
    target64.loaded = copy.copy(target.loaded)
    target64.loaded.model = model64
    data64 = as_dtype(data32, torch.float64)
    b = data32.all()
    rows = []
    for dname, (kind, k, sigma) in DEFENCES.items():
        d32, d64 = defence(target.model, kind, k, sigma), defence(model64, kind, k, sigma)
        for attack, budget in BUDGETS.items():
            t0 = time.perf_counter()
            res, points = {}, {}
            for tag, tg, d, data in (("fp32", target, d32, data32), ("fp64", target64, d64, data64)):
                res[tag] = evaluate_defense(tg, d, data, attack=attack, workdir=None, eps=0.2, seed=seed,
                                            draws=draws, batch_size=n, budgets=Budgets(**budget),
                                            show_progress=False, base=False,
                                            on_set=lambda _a, _k, r, tag=tag: points.__setitem__(tag, r.x_adv))
            a, c = (final_rows(r.defended[attack]) for r in (res["fp32"], res["fp64"]))
            clean32, clean64 = (final_rows(r.clean_defended) for r in (res["fp32"], res["fp64"]))
            differ = (a != c).any(0) | (clean32 != clean64).any(0)
            # the margin that decided: the worse of the clean image and the attack's point, in float64
            m = torch.minimum(margins(d64, b.x.double(), b.y, b.index, draws, seed),
                              margins(d64, points["fp64"], b.y, b.index, draws, seed)).abs()
            j32, j64 = (r.to_json() for r in (res["fp32"], res["fp64"]))
            row = {"defence": dname, "attack": attack, "budget": budget,
                   "robust_fp32": j32["robust_accuracy"][attack], "robust_fp64": j64["robust_accuracy"][attack],
                   "images_differing": int(differ.sum()), "n": n,
                   "margin_of_differing": sorted(round(float(v), 4) for v in m[differ]),
                   "smallest_margin_of_agreeing": round(float(m[~differ].min()), 4) if bool((~differ).any()) else None,
                   "median_margin": round(float(m.median()), 4), "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{dname:22s} {attack:10s} fp32 {100 * row['robust_fp32']:6.2f} % fp64 {100 * row['robust_fp64']:6.2f} % "
                  f"differ {row['images_differing']:2d}/{n}  margins {row['margin_of_differing']}", flush=True)
    return {"what": "per-image decisions of every attack's evaluation in float32 vs float64 (demo defence)",
            "command": "python benchmarks/same_answer_numerics.py " + " ".join(sys.argv[1:]),
            "n_images": n, "draws": draws, "seed": seed, "eps": 0.2, "torch": torch.__version__,
            "machine": platform.machine(), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="test digits (default 40)")
    ap.add_argument("--draws", type=int, default=3, help="final draws R of the repeated-draw scoring (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args()
    out = run(args.n, args.draws, args.seed)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_results(args.out, out)


if __name__ == "__main__":
    main()
