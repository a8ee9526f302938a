"""Result rendering: small functions that build Rich tables and write matplotlib PNG plots.

Each function takes plain data (dicts, lists, tensors) so commands, benchmarks and other reports can reuse them.
Plots are drawn on a standalone ``Figure`` with the Agg canvas (no global pyplot state, works without a display)
and written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rich.table import Table

from .artifacts import atomic_write_bytes


def pct(x: float | None, digits: int = 2) -> str:
    """A fraction as a percentage string; ``-`` for None."""
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def calibration_table(r: Mapping[str, Any]) -> Table:
    """The calibrate-k result: every k the search evaluated, in k order, with pass/fail and the chosen k (several
    layers: the searched k and every layer's k)."""
    base, tol = r["base_clean_accuracy"], r["tolerance"]
    chosen = r.get("k_search", r["k"])
    per_layer = r.get("curve_k")
    t = Table(title=f"calibrate-k: smallest k with clean accuracy ≥ {pct(base)} − {tol:g} points "
                    f"({r['n_examples']} images)")
    cols = ("k", *(["k per layer"] if per_layer else []), "clean accuracy", "Δ vs base (points)", "passes")
    for col in cols:
        t.add_column(col, justify="right" if col not in ("passes", "k per layer") else "center")
    for i, (k, acc) in enumerate(r["curve"]):
        ok = 100 * (base - acc) <= tol + 1e-9
        what = "chosen" if r.get("searched", True) else "given"
        mark = (f"[bold green]✓ {what}[/]" if ok else f"[bold red]✗ {what}[/]") if k == chosen \
            else ("✓" if ok else "[red]✗[/]")
        layers = [", ".join(f"{name} {v}" for name, v in per_layer[i][0].items())] if per_layer else []
        t.add_row(str(k), *layers, pct(acc), f"{100 * (acc - base):+.2f}", mark)
    return t


def summary_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """A two-column key/value table."""
    t = Table(title=title, show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    return t


def timing_table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    """A benchmark table: ``rows`` are dicts, ``columns`` the keys to show (values printed as given)."""
    t = Table(title=title)
    for col in columns:
        t.add_column(col, justify="left" if col == columns[0] else "right")
    for row in rows:
        t.add_row(*[str(row.get(c, "")) for c in columns])
    return t


#: the fixed colours of every igd plot: the base model is always grey, the defended model always blue
BASE_COLOR = "#6b6b6b"
DEFENDED_COLOR = "#1f77b4"
#: further series (other defended variants, rankings) after the defended blue, and the accent of a chosen point
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
ACCENT_COLOR = "#d62728"
BAND_COLOR = "#2ca02c"


def new_figure(width: float = 6.4, height: float = 4.0, ncols: int = 1) -> tuple[Any, list[Any]]:
    """A standalone figure (no pyplot state) with ``ncols`` axes side by side, in igd's style."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_axisbelow(True)
    return fig, axes


def _save_figure(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_calibration(path: str | Path, curve: Sequence[Sequence[float]], base_accuracy: float, tolerance: float,
                     k: int, n_neurons: int, title: str = "", xlabel: str | None = None) -> Path:
    """Clean accuracy against k (log scale) with the base accuracy, the tolerance band and the chosen k
    (the paper's Fig. 5A), written as a PNG."""
    pts = sorted((int(a), 100 * float(b)) for a, b in curve)
    base = 100 * base_accuracy
    fig, (ax,) = new_figure(6.4, 4.2)
    ax.axhspan(base - tolerance, base, color=BAND_COLOR, alpha=0.15,
               label=f"tolerance band (base − {tolerance:g} points)")
    ax.axhline(base, color=BASE_COLOR, lw=1.5, label=f"base model ({base:.2f}%)")
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=DEFENDED_COLOR, ms=5,
            label="IG-Defense (evaluated k)")
    kacc = dict(pts).get(k)
    if kacc is not None:
        ax.plot([k], [kacc], "*", color=ACCENT_COLOR, ms=14, zorder=5, label=f"chosen k = {k} ({kacc:.2f}%)")
        ax.axvline(k, color=ACCENT_COLOR, lw=0.8, ls="--")
    ks = [p[0] for p in pts]
    if max(ks) / min(ks) > 8:  # the search went far down: a log axis shows every step
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.set_xlim(min(ks) / 1.3, n_neurons * 1.25)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    else:
        pad = max(1.0, 0.05 * (max(ks) - min(ks)))
        ax.set_xlim(min(ks) - pad, max(ks) + pad)
    ax.set_xlabel(xlabel or f"k (neurons kept per class, of N = {n_neurons})")
    ax.set_ylabel("clean accuracy (%)")
    lo = min([p[1] for p in pts] + [base - tolerance])
    ax.set_ylim(max(0.0, lo - 0.1 * (base - lo) - 1), min(100.5, base + 0.25 * (base - lo) + 1))
    ax.set_title(title or "clean accuracy vs k")
    ax.legend(loc="best", fontsize=8)
    return _save_figure(fig, path)


def plot_shift(path: str | Path, result: Mapping[str, Any], labels: Mapping[str, str], title: str = "") -> Path:
    """The activation shift of Sec. 3 as bars, successful and unsuccessful attacks side by side (Fig. 2C/D):
    relative change (%) of the mean activation of each neuron group, with the image count per panel."""
    fig, axes = new_figure(8.0, 3.6, ncols=2)
    groups = result["groups"]
    vals = [v for g in groups.values() for v in g["percent"].values() if v is not None]
    lim = max([abs(v) for v in vals] + [1.0]) * 1.15
    order = list(labels) or list(dict.fromkeys(r for g in groups.values() for r in g["percent"]))
    for ax, (g, data) in zip(axes, groups.items()):
        rows = [r for r, v in data["percent"].items()]
        ys = [data["percent"][r] if data["percent"][r] is not None else 0.0 for r in rows]
        # one colour per neuron group, the same in both panels
        colors = [SERIES_COLORS[(order.index(r) if r in order else i) % len(SERIES_COLORS)] for i, r in enumerate(rows)]
        ax.bar(range(len(rows)), ys, color=colors)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([labels.get(r, r) for r in rows], rotation=20, ha="right", fontsize=8)
        for i, v in enumerate(ys):
            ax.annotate(f"{v:+.1f}", (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
        ax.set_ylim(-lim, lim)
        if ax is axes[0]:
            ax.set_ylabel("mean activation change (% of clean)")
        ax.set_title(f"{g} attacks (n = {data['n']})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)


def plot_ablation(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                  column_labels: Mapping[str, str], title: str = "") -> Path:
    """Table 6 as horizontal bars, one panel per column (accuracy in %, ± std over draws for randomized rows);
    the base model's row grey, defended variants blue (hatched when smoothing is on)."""
    cols = [c for c in columns if any(r["figures"].get(c) is not None for r in rows)]
    fig, axes = new_figure(3.0 * len(cols) + 1.5, 0.42 * len(rows) + 1.4, ncols=len(cols))
    names = [r["name"] for r in rows]
    for ax, c in zip(axes, cols):
        vals = [100 * (r["figures"].get(c) or 0.0) for r in rows]
        errs = [100 * (r["figures"].get(f"{c}_std") or 0.0) for r in rows]
        colors = [BASE_COLOR if r["masking"] == "none" and r["passes"] == 1 and not r["rs"] else DEFENDED_COLOR
                  for r in rows]
        bars = ax.barh(range(len(rows)), vals, xerr=errs, color=colors, capsize=2)
        for b, r in zip(bars, rows):
            if r["rs"]:
                b.set_hatch("//")
                b.set_edgecolor("white")
        base = vals[0]
        ax.axvline(base, color=BASE_COLOR, lw=0.8, ls="--")
        lo = max(0.0, min(vals) - 2 * max(errs + [1.0]) - 3)
        ax.set_xlim(lo, min(100.0, max(vals) + 2 * max(errs + [1.0]) + 3))
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{column_labels.get(c, c)} accuracy (%)")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save_figure(fig, path)


def plot_sweep(path: str | Path, points: Sequence[Mapping[str, Any]], xlabel: str, *, categorical: bool = False,
               log: bool = False, robust_label: str = "robust", title: str = "") -> Path:
    """Clean and robust accuracy (%) against the swept setting: the defended model in blue (± std over draws as
    error bars), the base model in grey as reference; clean solid, robust dashed."""
    fig, (ax,) = new_figure(6.4, 4.0)
    xs = list(range(len(points))) if categorical else [float(p["value"]) for p in points]

    def series(key: str) -> list[float | None]:
        return [None if p.get(key) is None else 100 * p[key] for p in points]

    def draw(key: str, color: str, style: str, label: str, std_key: str | None = None) -> None:
        ys = series(key)
        if all(v is None for v in ys):
            return
        pts = [(x, y, 100 * (p.get(std_key) or 0.0) if std_key else 0.0) for x, y, p in zip(xs, ys, points)
               if y is not None]
        ax.errorbar([a for a, _, _ in pts], [b for _, b, _ in pts], yerr=[c for _, _, c in pts] if std_key else None,
                    color=color, ls=style, marker="o" if color == DEFENDED_COLOR else None, ms=4, capsize=3,
                    label=label)

    draw("base_clean", BASE_COLOR, "-", "base model, clean")
    draw("base_robust", BASE_COLOR, "--", f"base model, {robust_label}")
    draw("clean", DEFENDED_COLOR, "-", "IG-Defense, clean", "clean_std")
    draw("robust", DEFENDED_COLOR, "--", f"IG-Defense, {robust_label}", "robust_std")
    if categorical:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(p["value"]) for p in points])
    elif log:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"accuracy vs {xlabel}", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return _save_figure(fig, path)


# --- analysis tables: plain cells, rendered by Rich in the terminal and as Markdown in igd report ------------

Cells = tuple[list[str], list[list[str]]]


def rich_table(title: str, cells: Cells) -> Table:
    """A Rich table from (headers, rows); the first column left-aligned, the others right."""
    headers, rows = cells
    t = Table(title=title)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t


def markdown_table(cells: Cells) -> list[str]:
    """(headers, rows) as GitHub Markdown table lines (``|`` in cells escaped)."""
    headers, rows = cells

    def line(cols: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cols) + " |"

    return [line(headers), "|" + "|".join("---" for _ in headers) + "|", *[line(r) for r in rows]]


def _pm(v: float | None, std: float | None = None) -> str:
    """An accuracy in % with ± std over draws for a randomized model (give None for a deterministic one)."""
    if v is None:
        return "—"
    return f"{100 * v:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def shift_cells(r: Mapping[str, Any]) -> Cells:
    """Table 7's row for one model: % change per neuron group, successful then unsuccessful attacks."""
    headers, rows = ["group of images", "images"], []
    cols = list(dict.fromkeys(k for g in r["groups"].values() for k in g["percent"]))
    headers += [r.get("labels", {}).get(c, c) + " %" for c in cols]
    for g, v in r["groups"].items():
        rows.append([f"{g} attacks", str(v["n"])] +
                    [("—" if v["percent"].get(c) is None else f"{v['percent'][c]:+.2f}") if c in v["percent"]
                     else "n/a" for c in cols])
    return headers, rows


def ablation_cells(r: Mapping[str, Any]) -> Cells:
    """Table 6: one row per variant, accuracies in % (mean ± std over draws for randomized rows)."""
    labels = r.get("column_labels", {})
    headers = ["#", "variant", "passes", "masking", "RS"] + [f"{labels.get(c, c)} %" for c in r["columns"]]
    rows = []
    for i, row in enumerate(r["rows"], 1):
        f = row["figures"]
        rows.append([str(i), row["name"], str(row["passes"]), row["masking"], "✓" if row["rs"] else "✗"] +
                    [_pm(f.get(c), f.get(f"{c}_std") if row["randomized"] else None) for c in r["columns"]])
    return headers, rows


def sweep_cells(r: Mapping[str, Any]) -> Cells:
    """One row per sweep point: defended and base clean and robust accuracy (%), and whether it was cached."""
    from .evaluate import column_label

    robust = None if r["attack"] == "none" else column_label(r["attack"]) if r["attack"] != "iw-wc" else "IW-WC"
    headers = [r["over"], "clean %", "base clean %"] + ([f"{robust} %", f"base {robust} %"] if robust else []) + \
        ["draws", "point"]
    rows = []
    for p in r["points"]:
        rnd = bool(p.get("randomized")) and int(p.get("draws", 1)) > 1  # ± only where draws were repeated
        rows.append([str(p["value"]), _pm(p["clean"], p.get("clean_std") if rnd else None), _pm(p["base_clean"])] +
                    ([_pm(p.get("robust"), p.get("robust_std") if rnd else None), _pm(p.get("base_robust"))]
                     if robust else []) +
                    [str(p.get("draws", 1)), "reused" if p.get("cached") else "computed"])
    return headers, rows
