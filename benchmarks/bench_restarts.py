"""APGD+EoT with R restarts in one run against R one-restart runs combined per image, on a randomized defence.

A restart is only as good as the choice of the point it keeps. igd runs every restart on every image and keeps, per
image, the point wrong in the most of 5 draws (``igd_cli.attacks.base.DrawsPick``). The attacker's alternative is to
run R independent one-restart attacks (seeds 0..R-1) and take, per image, the worst of their points under the
repeated-draw rule of the evaluation (``igd_cli.scoring.final_of_selected``). Both are scored the same way here:
every candidate classified with the same ``2 × --draws`` keyed draws, the first half scoring, the second choosing.

    python benchmarks/bench_restarts.py --mask runs/demo/mask-lo-ir-block3.safetensors --n 100 \\
        --out benchmarks/results/restarts-demo-quick-cpu.json

Without ``--mask`` it makes the demo pipeline's mask first (``igd pipeline --piece calibrate`` in a temporary
folder: LO-IR at ``block3``, k chosen on the held-out test images).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import command_line, write_results  # noqa: E402
from bench_pipeline_demo import igd, load  # noqa: E402

from igd_cli import noise  # noqa: E402
from igd_cli.attacks import make_attack, run_attack  # noqa: E402
from igd_cli.attacks.base import gather  # noqa: E402
from igd_cli.common import open_target  # noqa: E402
from igd_cli.defense import load_defense  # noqa: E402
from igd_cli.scoring import Score, classify, final_of_selected, final_rows, rows_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def demo_mask(folder: Path) -> Path:
    """The demo pipeline's mask, made by ``igd pipeline --piece calibrate`` in ``folder``."""
    made = igd(ROOT, str(folder), ["pipeline", "--out", "run", "--piece", "calibrate", "--json"])
    return folder / made["result"]["out"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mask", type=Path, default=None, help="an IG-Defense mask of the demo (default: make one)")
    ap.add_argument("--n", type=int, default=100, help="the first N test images")
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eot-iter", type=int, default=5)
    ap.add_argument("--draws", type=int, default=5, help="scoring draws (as many again choose)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="igd-restarts-") as tmp:
        mask = a.mask if a.mask is not None else demo_mask(Path(tmp))
        target = open_target("demo", device="cpu")
        defense = load_defense(target, mask)
        eps = target.default_eps()
        data = target.eval_data("test", a.n)
        pos = torch.arange(len(data))
        x, y = gather(data, pos)
        rows = rows_for(defense, "draws", a.draws)
        keys = noise.image_keys(pos, x)

        def bits(points: torch.Tensor) -> torch.Tensor:
            return classify(defense, points, y, rows, seed=0, keys=keys, batch_size=a.batch_size)

        def attack(restarts: int, seed: int) -> tuple[torch.Tensor, float]:
            atk = make_attack("apgd-eot", defense, eps=eps, seed=seed, steps=a.steps, restarts=restarts,
                              eot_iter=a.eot_iter)
            t0 = time.perf_counter()
            res = run_attack(atk, data, batch_size=a.batch_size, description=f"apgd-eot, {restarts} restart(s), "
                                                                           f"seed {seed}")
            return res.x_adv, time.perf_counter() - t0

        clean = bits(x)
        many, many_s = attack(a.restarts, 0)
        singles = [attack(1, s) for s in range(a.restarts)]
        many_bits = bits(many)
        single_bits = [bits(p) for p, _ in singles]
        one_run = Score.of(final_of_selected([clean, many_bits]))
        combined = Score.of(final_of_selected([clean, *single_bits]))
        each = [Score.of(final_of_selected([clean, b])) for b in single_bits]
        # images whose final correctness (majority of the scoring draws) differs between the two
        maj = lambda f: 2 * f.sum(0) > f.shape[0]  # noqa: E731
        differ = int((maj(final_of_selected([clean, many_bits])) != maj(final_of_selected([clean, *single_bits])))
                     .sum())
        out = {
            "command": command_line("bench_restarts.py", argv),
            "what": f"APGD+EoT on the smoothed demo defence: {a.restarts} restarts in one run against "
                    f"{a.restarts} one-restart runs (seeds 0..{a.restarts - 1}) combined per image by the "
                    f"repeated-draw rule; both scored on the same {a.draws} keyed draws, chosen on {a.draws} more",
            "mask": "the demo pipeline's (igd pipeline --piece calibrate)" if a.mask is None else str(a.mask),
            "k": defense.k, "layer": defense.layer, "defense": defense.settings(), "eps": eps, "n_images": len(data),
            "budgets": {"steps": a.steps, "eot_iter": a.eot_iter, "restarts": a.restarts}, "draws": a.draws,
            "clean": Score.of(final_rows(clean)).to_json(),
            "one_run_of_restarts": {**one_run.to_json(), "seconds": round(many_s, 1)},
            "single_runs_combined": {**combined.to_json(), "seconds": round(sum(s for _, s in singles), 1)},
            "each_single_run": [e.to_json() for e in each],
            "images_decided_differently": differ,
            "difference": one_run.mean - combined.mean,
            "difference_of": "one run of R restarts minus R single runs combined (mean over the scoring draws)",
            "threads": torch.get_num_threads(), "load_at_end": load(),
        }
    print(f"{a.restarts} restarts in one run: {100 * one_run.mean:.2f} ± {100 * one_run.std:.2f} % "
          f"({out['one_run_of_restarts']['seconds']} s); {a.restarts} single runs combined: "
          f"{100 * combined.mean:.2f} ± {100 * combined.std:.2f} % ({out['single_runs_combined']['seconds']} s); "
          f"{differ} images decided differently")
    if a.out is not None:
        write_results(a.out, out)
    return out


if __name__ == "__main__":
    main()
