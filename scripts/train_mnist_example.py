#!/usr/bin/env python
"""Train the README's own-architecture example (examples/mnist_cnn.py) on MNIST, then run igd's whole pipeline on it.

    python scripts/train_mnist_example.py [--eps 0.1] [--epochs 8] [--out-dir runs/mnist-example] [--no-pipeline]

Data: ``mnist-test-10000.safetensors`` (the MNIST test set) from ``--data`` or the data folder (``$IGD_DATA_DIR``,
else ``$IGD_HOME/data``). The network trains on images
2000..9999 and is tested on images 0..1999; both parts are written beside the weights as tensor files, so the
pipeline ranks on training images (``--probe-dataset``) and calibrates and attacks on held-out images only.
Training is FGSM with a random start at ε (Wong et al., "Fast is better than free", step 1.25ε) on normalised
inputs, one CPU thread, bit-for-bit reproducible; the weights are written as a plain state dict *without* the
normalisation, which igd adds with ``--normalize mnist``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.mnist_cnn import small_cnn  # noqa: E402
from igd_cli.archs import Normalized  # noqa: E402
from igd_cli.artifacts import save_artifact  # noqa: E402
from igd_cli.data import data_dir, load_dataset  # noqa: E402
from igd_cli.user_arch import NORMALIZATIONS  # noqa: E402
from train_demo import accuracy, pgd  # noqa: E402  (the demo's PGD and accuracy, same folder)

DATA_FILE = "mnist-test-10000.safetensors"  # in the data folder unless --data names it
ARCH = "examples/mnist_cnn.py:small_cnn"
HELD_OUT = 2000  # images 0..HELD_OUT-1 are the test part


def pipeline_args(weights: Path, test: Path, train: Path, eps: float, out: Path, n_probe: int,
                  n_examples: int) -> list[str]:
    """The ``igd pipeline`` command line for the trained example (printed, and run unless --no-pipeline): it ranks
    on training images (``--probe-dataset``) and calibrates and attacks on held-out ones."""
    return ["pipeline", "--model", str(weights), "--arch", str(ROOT / ARCH), "--normalize", "mnist",
            "--dataset", str(test), "--probe-dataset", str(train), "--layer", "block3", "--eps", str(eps),
            "--preset", "quick", "--n-probe", str(n_probe), "--n-examples", str(n_examples), "--out", str(out)]


def write_split(path: Path, x: torch.Tensor, y: torch.Tensor, classes: list[str], source: str) -> Path:
    """Images in [0, 1] as a tensor file in igd's data-file format (x uint8 NCHW, y int64), written atomically:
    the pipeline's ``--dataset`` and ``--probe-dataset`` (a file has no splits, so each part is its own file)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"x": (x * 255).round().to(torch.uint8).contiguous(), "y": y.to(torch.int64).contiguous()}, str(tmp),
              metadata={"classes": json.dumps(classes), "source": source})
    os.replace(tmp, path)
    return path


def batched_accuracy(model, x, y, chunk: int = 500, **kw) -> float:
    """:func:`train_demo.accuracy` over chunks of ``chunk`` images (bounded memory for 2000 MNIST images)."""
    return sum(accuracy(model, x[i:i + chunk], y[i:i + chunk], **kw) * len(y[i:i + chunk])
               for i in range(0, len(y), chunk)) / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help=f"MNIST as a safetensors file (x uint8, y); default: {DATA_FILE} in the data folder "
                    "($IGD_DATA_DIR, else $IGD_HOME/data)")
    ap.add_argument("--eps", type=float, default=0.1, help="l-inf training budget (0: standard training)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=None, help="train on the first N images after the test part")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "mnist-example")
    ap.add_argument("--n-probe", type=int, default=1000, help="pipeline: ranking probe images")
    ap.add_argument("--n-examples", type=int, default=200, help="pipeline: calibration and evaluation images")
    ap.add_argument("--no-pipeline", action="store_true", help="only train")
    args = ap.parse_args()
    if args.data is None:
        args.data = data_dir() / DATA_FILE
    if not args.data.is_file():
        print(f"error: {args.data} not found: place {DATA_FILE} there, or pass --data FILE", file=sys.stderr)
        raise SystemExit(2)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # bit-for-bit reproducible on CPU
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_dataset(str(args.data), "test")
    stop = len(data) if args.n_train is None else min(len(data), HELD_OUT + args.n_train)
    train, test = data.get(HELD_OUT, stop), data.get(0, HELD_OUT)
    net = small_cnn(10)
    model = Normalized(net, *NORMALIZATIONS["mnist"])  # trained on normalised inputs, saved without it
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_total = max(1, args.epochs * ((len(train.y) + args.batch_size - 1) // args.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps_total)
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train.y), generator=gen)
        eps = args.eps * min(1.0, (epoch + 1) / max(1, args.epochs // 2))  # ε warm-up over the first half
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x, y = train.x[idx], train.y[idx]
            if eps > 0:
                model.eval()  # craft the attack with fixed BN statistics
                x = pgd(model, x, y, eps, 1, 1.25 * eps, gen)  # one step from a random start: FGSM-RS
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, clean {batched_accuracy(model, test.x, test.y):.4f}",
              file=sys.stderr)
    model.eval()
    train_seconds = time.time() - t0
    clean = batched_accuracy(model, test.x, test.y)
    robust = (batched_accuracy(model, test.x, test.y, eps=args.eps, steps=20,
                               generator=torch.Generator().manual_seed(1)) if args.eps > 0 else None)
    weights = args.out_dir / "mnist_cnn.safetensors"
    meta = {"arch": ARCH, "normalize": "mnist", "num_classes": 10, "dataset": str(args.data), "eps": args.eps,
            "train_images": [HELD_OUT, stop], "test_images": [0, HELD_OUT],
            "clean_accuracy": round(clean, 4), "pgd_accuracy": None if robust is None else round(robust, 4),
            "pgd_eval": "PGD-20, step 2.5ε/20, random start",
            "training": {k: getattr(args, k) for k in ("eps", "epochs", "batch_size", "lr", "seed")},
            "torch_version": torch.__version__, "train_seconds": round(train_seconds, 1)}
    save_artifact(weights, "model", {k: v.contiguous() for k, v in net.state_dict().items()}, meta)
    print(json.dumps(meta, indent=1))
    name = args.data.name
    test_file = write_split(args.out_dir / f"mnist-test-{HELD_OUT}.safetensors", test.x, test.y, list(data.classes),
                            f"{name} images 0..{HELD_OUT - 1} (held out from training)")
    train_file = write_split(args.out_dir / f"mnist-train-{stop - HELD_OUT}.safetensors", train.x, train.y,
                             list(data.classes), f"{name} images {HELD_OUT}..{stop - 1} (the training images)")
    cli_args = pipeline_args(weights, test_file, train_file, args.eps, args.out_dir / "pipeline", args.n_probe,
                             args.n_examples)
    print("igd " + " ".join(cli_args), file=sys.stderr)
    if not args.no_pipeline:
        from igd_cli.cli import main as igd_main

        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(os.cpu_count() or 1)  # training used one thread for reproducibility; igd uses all
        sys.exit(igd_main(cli_args))


if __name__ == "__main__":
    main()
