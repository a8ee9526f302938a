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
    from matplotlib.figure import Figure

    pts = sorted((int(a), 100 * float(b)) for a, b in curve)
    base = 100 * base_accuracy
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.axhspan(base - tolerance, base, color="tab:green", alpha=0.15,
               label=f"tolerance band (base − {tolerance:g} points)")
    ax.axhline(base, color="tab:green", lw=1.5, label=f"base model ({base:.2f}%)")
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:blue", ms=5, label="IG-Defense (evaluated k)")
    kacc = dict(pts).get(k)
    if kacc is not None:
        ax.plot([k], [kacc], "*", color="tab:red", ms=14, zorder=5, label=f"chosen k = {k} ({kacc:.2f}%)")
        ax.axvline(k, color="tab:red", lw=0.8, ls="--")
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
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "clean accuracy vs k")
    ax.legend(loc="best", fontsize=8)
    return _save_figure(fig, path)
