"""What keying the smoothing noise by the image costs, against keying it by the bytes of each queried point.

igd draws a randomized defence's noise as a function of (stream, the image's identity, the query's ordinal for that
image) (:mod:`igd_cli.noise`): per query, a gather and a scatter of one int64 per row on the device, then the
Gaussian generator. The scheme it replaced hashed every queried row's bytes (a full pass over the input in int64
arithmetic), moved the hashes to the host and counted each row's earlier occurrences in a Python dict. That scheme is
written out here (:class:`ContentKeyed`, for the comparison only) and swapped into the same defence, so both are
timed in the same run on the same workloads:

- the defended forward (one query of a batch), the pure cost of the noise per query;
- RayS with its paper budget of 10,000 queries per image (many small queries);
- the demo's IW-WC at quick budgets (every attack, the scoring).

    python benchmarks/bench_noise.py --repeats 3 --out benchmarks/results/noise-keying-cost-cpu.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import write_results  # noqa: E402  (puts the repository on the path)

from igd_cli import noise  # noqa: E402
from igd_cli.attacks import make_attack, run_attack  # noqa: E402
from igd_cli.common import open_target  # noqa: E402
from igd_cli.data import load_dataset  # noqa: E402
from igd_cli.defense import IGDefense, topk_mask  # noqa: E402
from igd_cli.evaluate import Budgets, evaluate_defense  # noqa: E402


class ContentKeyed:
    """The replaced scheme, for comparison: a row's draw keyed by (seed, the row's bytes, its occurrences so far),
    the occurrences counted per distinct row in a host-side dict."""

    fresh = True

    def __init__(self, seed: int = 0):
        self.seed, self.seen = int(seed), {}

    def restart(self, seed: int | None = None) -> None:
        self.seen = {}

    def skip(self, x: torch.Tensor, queries: int) -> None:
        h = noise.content_hash(x).tolist()
        for _ in range(queries):
            for v in h:
                self.seen[v] = self.seen.get(v, 0) + 1

    def sample(self, x: torch.Tensor, draws: int) -> torch.Tensor:
        hashes = noise.content_hash(x)
        counts = []
        for v in hashes.tolist():  # the per-query host transfer and Python loop
            c = self.seen.get(v, 0)
            counts.append(c)
            self.seen[v] = c + 1
        ordinals = torch.tensor(counts, dtype=torch.int64, device=x.device)
        keys = noise.draw_keys(self.seed, hashes, ordinals, draws)
        return noise.gaussian(keys, tuple(x.shape[1:]), dtype=x.dtype)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def workloads(n_forward: int, n_rays: int, n_iwwc: int, queries: int):
    target = open_target("demo", None, None, device="cpu")
    mask = topk_mask(target.model.linear.weight.detach().t(), 8)
    d = IGDefense(target.model, "block3", mask, sigma=0.1)
    fwd = load_dataset("digits", "test", n_forward).all()
    keys = noise.image_keys(fwd.index, fwd.x)

    @torch.no_grad()
    def forward():
        with noise.images(keys, 0):
            for _ in range(20):
                d(fwd.x)

    rays_data = load_dataset("digits", "test", n_rays)

    def rays():
        run_attack(make_attack("rays", d, eps=0.05, queries=queries), rays_data, batch_size=n_rays,
                   show_progress=False)

    iwwc_data = load_dataset("digits", "test", n_iwwc)

    def iwwc():
        evaluate_defense(target, d, iwwc_data, attack="iw-wc", workdir=None, eps=0.2, draws=5,
                         budgets=Budgets(steps=20, restarts=1, queries=1000, eot_iter=5), show_progress=False)

    return d, {f"defended forward ×20 (batch {n_forward})": forward,
               f"RayS, {queries} queries ({n_rays} images)": rays,
               f"IW-WC, quick budgets ({n_iwwc} images)": iwwc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-forward", type=int, default=128)
    ap.add_argument("--n-rays", type=int, default=16)
    ap.add_argument("--n-iwwc", type=int, default=40)
    ap.add_argument("--queries", type=int, default=10000, help="RayS's budget (default: the paper's 10,000)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: the figures do not depend on what else the machine runs in parallel
    d, jobs = workloads(args.n_forward, args.n_rays, args.n_iwwc, args.queries)
    keyed, content = d._noise, ContentKeyed()
    rows = []
    for scheme in (keyed, content):  # warm-up: the generator's tables, the allocator, the fx graphs
        d._noise = scheme
        next(iter(jobs.values()))()
    for name, fn in jobs.items():
        res = {}
        # interleaved, so that a change of machine load falls on both
        for _ in range(args.repeats):
            for tag, scheme in (("image-keyed", keyed), ("content-keyed", content)):
                d._noise = scheme
                res.setdefault(tag, []).append(seconds(fn))
        d._noise = keyed
        med = {k: statistics.median(v) for k, v in res.items()}
        rows.append({"workload": name, "seconds": res, "median_s": med,
                     "ratio_image_over_content": med["image-keyed"] / med["content-keyed"]})
        print(f"{name:42s} image-keyed {med['image-keyed']:8.3f} s  content-keyed {med['content-keyed']:8.3f} s  "
              f"ratio {rows[-1]['ratio_image_over_content']:.3f}", flush=True)
    load = os.getloadavg()
    out = {"what": "noise keyed by the image vs by the bytes of each queried point: median seconds, interleaved runs",
           "command": "python benchmarks/bench_noise.py " + " ".join(sys.argv[1:]), "repeats": args.repeats,
           "threads": 1, "torch": torch.__version__, "machine": platform.machine(),
           "load_average_at_end": [round(v, 2) for v in load], "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_results(args.out, out)


if __name__ == "__main__":
    main()
