"""The audit's PNG plots: loss surfaces (check 6, the paper's Fig. 8), robust accuracy against attack steps
(check 4, Fig. 7C) and against the budget (check 5, Table 10). Style and atomic writes as :mod:`igd_cli.report`.

Example::

    plot_surfaces("surface.png", {"audited": surface}, eps=0.2)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from ..report import _save_figure
from .gradients import Surface

LABELS = {"audited": "audited model", "base": "base model"}
#: the audited model's row name when a base model is drawn beside it
DEFENDED = "IG-Defense"


def plot_surfaces(path: str | Path, surfaces: Mapping[str, Surface], eps: float, title: str = "") -> Path:
    """One panel per model and image: the loss over α (along sign(g)) and β (orthogonal), ε-ball corners at ±ε;
    the gradient line β = 0, α ≥ 0 is drawn, misclassified grid points are dotted."""
    from matplotlib.figure import Figure

    names = list(surfaces)
    n = surfaces[names[0]].losses.shape[0]
    fig = Figure(figsize=(2.9 * n + 0.8, 2.3 * len(names) + 0.6))
    fig.subplots_adjust(wspace=0.45)
    for r, name in enumerate(names):
        s = surfaces[name]
        a = s.alphas.numpy()
        for i in range(n):
            ax = fig.add_subplot(len(names), n, r * n + i + 1)
            im = ax.imshow(s.losses[i].numpy(), origin="lower", extent=[a[0], a[-1], a[0], a[-1]], aspect="equal",
                           cmap="viridis")
            ax.contour(a, a, s.losses[i].numpy(), levels=6, colors="white", linewidths=0.4)
            ax.plot([0, 0], [0, a[-1]], color="tab:red", lw=1.2)  # β = 0, α ≥ 0
            w = s.wrong[i].nonzero()
            if len(w):
                ax.plot(a[w[:, 1].numpy()], a[w[:, 0].numpy()], ".", color="white", ms=2)
            ax.set_xticks([a[0], 0, a[-1]], ["−ε", "0", "ε"])
            ax.set_yticks([a[0], 0, a[-1]], ["−ε", "0", "ε"] if i == 0 else [])
            ax.tick_params(labelsize=6)
            if r == len(names) - 1:
                ax.set_xlabel("β (⊥ gradient)", fontsize=7)
            if i == 0:
                label = DEFENDED if name == "audited" and "base" in surfaces else LABELS.get(name, name)
                ax.set_ylabel(f"{label}\nα (sign of gradient)", fontsize=7)
            ax.set_title(f"image {i}", fontsize=7)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.ax.tick_params(labelsize=5)
    fig.suptitle(title or f"cross-entropy on x + α·sign(g) + β·g⊥ over the ε-ball (ε = {eps:.4g}); red: gradient "
                          "direction; dots: misclassified", fontsize=8)
    return _save_figure(fig, path)


def plot_curve(path: str | Path, points: Sequence[Mapping[str, Any]], *, x: str, xlabel: str, title: str,
               log_x: bool = False) -> Path:
    """Robust accuracy (mean ± std over draws) against ``points[i][x]``, labelled by ``points[i]['label']``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    xs = [p[x] for p in points]
    ys = [100 * p["mean"] for p in points]
    es = [100 * p["std"] for p in points]
    ax.errorbar(xs, ys, yerr=es, fmt="o-", color="tab:blue", capsize=3, ms=5)
    for i, (xv, yv, p) in enumerate(zip(xs, ys, points)):  # labels alternate above and below the curve
        ax.annotate(f"{p.get('label', '')} {yv:.1f}%", (xv, yv), textcoords="offset points",
                    xytext=(4, 8 if i % 2 == 0 else -14), fontsize=7)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    return _save_figure(fig, path)
