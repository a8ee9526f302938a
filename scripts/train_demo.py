#!/usr/bin/env python
"""Retrain the embedded demo model reproducibly: PGD adversarial training of igd's DemoCNN on digits.

    python scripts/train_demo.py [--eps 0.2] [--epochs 60] [--out artifacts/demo/demo.safetensors]

Writes the weights as a ``model`` artifact whose metadata records the ε it was trained for (attacks on
``--model demo`` default to it), the training settings and the clean and PGD-20 test accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from igd_cli.archs import DemoCNN
from igd_cli.artifacts import save_artifact
from igd_cli.data import load_dataset


def pgd(model, x, y, eps, steps, alpha, generator):
    """l-inf PGD with a uniform random start (Madry et al.); inputs stay in [0, 1]."""
    delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x_adv.detach() + alpha * grad.sign()).clamp(x - eps, x + eps).clamp(0, 1)
    return x_adv.detach()


def accuracy(model, x, y, eps=None, steps=20, generator=None):
    model.eval()
    if eps:
        x = pgd(model, x, y, eps, steps, 2.5 * eps / steps, generator)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=10, help="PGD steps during training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "artifacts/demo/demo.safetensors"))
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # bit-for-bit reproducible on CPU
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    train, test = load_dataset("digits", "train").all(), load_dataset("digits", "test").all()
    model = DemoCNN(10)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_total = args.epochs * ((len(train.y) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps_total)
    t0 = time.time()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train.y), generator=gen)
        eps = args.eps * min(1.0, (epoch + 1) / (0.3 * args.epochs))  # ε warm-up over the first 30%
        model.train()
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x, y = train.x[idx], train.y[idx]
            model.eval()  # craft the attack with fixed BN statistics
            x_adv = pgd(model, x, y, eps, args.steps, 2.5 * eps / args.steps, gen)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, clean {accuracy(model, test.x, test.y):.4f}")
    model.eval()
    clean = accuracy(model, test.x, test.y)
    robust = accuracy(model, test.x, test.y, eps=args.eps, steps=20, generator=torch.Generator().manual_seed(1))
    meta = {"arch": "demo-cnn", "num_classes": 10, "dataset": "digits", "eps": args.eps,
            "clean_accuracy": round(clean, 4), "pgd_accuracy": round(robust, 4), "pgd_eval": "PGD-20, step 2.5ε/20",
            "training": {k: getattr(args, k) for k in ("eps", "epochs", "batch_size", "lr", "steps", "seed")},
            "torch_version": torch.__version__, "train_seconds": round(time.time() - t0, 1)}
    save_artifact(args.out, "model", {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
