"""The base-vs-defended table (the paper's Table 8 for one defence, transposed) as plain cells, rendered by Rich in
the terminal and as Markdown in reports, and the class-wise table (Table 11)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .eval_result import (BEYOND_NOTE, BEYOND_NOTE_GENERIC, BEYOND_PAPER, DIRECT, TRANSFER, EvalResult, column_key,
                          column_label)

def scoring_note(r: dict[str, Any]) -> str:
    """One sentence saying how the defended figures were produced (the protocol and its draws)."""
    if not r.get("defended"):
        return "base model: deterministic, every point scored once (exact)"
    if not r.get("randomized"):
        why = "no smoothing" if (r.get("defense_label") or "IG-Defense") == "IG-Defense" else "no fresh randomness"
        return f"defence deterministic ({why}): every point scored once, all figures exact"
    if r.get("protocol") == "single-draw":
        return ("single-draw protocol: one noise draw per set and the AND over sets — a near-boundary point is a "
                "coin toss per draw, so this mixes attack strength with noise (not comparable with the literature)")
    d = r["draws"]
    ties = " (ties: the lowest mean margin, --protocol draws-margin)" if r.get("protocol") == "draws-margin" else ""
    return (f"randomized defence scored as Croce et al. (ICML 2022): every point classified {d} times, per image the "
            f"point with the lowest mean correctness selected{ties}, scored on {d} fresh draws; mean over those "
            f"draws (± sample std); base model deterministic: exact")


@dataclass
class TableCells:
    """The cells of the base-vs-defended table (plain strings), shared by the terminal (Rich) and Markdown
    renderings: ``sections`` holds the row index where each section starts, ``notes`` the lines under it."""

    title: str
    caption: str
    headers: list[str]
    rows: list[list[str]]
    sections: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def table_cells(result: EvalResult | dict[str, Any], title: str | None = None) -> TableCells:
    """The paper's Table 8 for one defence, transposed: rows clean, each attack and the worst case, columns base
    model, + IG-Defense and Δ (accuracies in %, defended ones mean over draws). A column measured on survivors (†)
    is a lower bound: shown as ``≥`` and given no Δ. A randomized defence gets three worst-case rows: mean ± std
    over draws, majority vote and correct in all draws."""
    r = result.to_json() if isinstance(result, EvalResult) else result
    has_def = bool(r.get("defended"))
    no_grad = list(r.get("no_gradient") or [])
    keys = list(dict.fromkeys(list(r["robust_accuracy"]) + list(r["base_robust_accuracy"]) + no_grad))
    order = [*DIRECT, *[column_key(a, True) for a in TRANSFER], *BEYOND_PAPER]
    keys.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    surv = r.get("measured_on_survivors", {})
    draws = int(r.get("draws") or 1)
    eps = f", ε={r['eps']:.4g}" if r.get("eps") is not None else ""
    headers = ["attack", "base model"]
    label = r.get("defense_label") or "IG-Defense"
    if has_def:
        headers += [f"+ {label}" + (f" (mean of {draws} draws)" if draws > 1 else ""), "Δ (points)"]
    t = TableCells(title or f"accuracy (%), {r['n_examples']} images{eps}", scoring_note(r), headers, [])

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f}"

    def row(name: str, b: float | None, d: float | None, *, bound: bool = False, std: float | None = None,
            why: str | None = None) -> None:
        if not has_def:
            t.rows.append([name, fmt(b)])
            return
        cell = why or ("≥ " if bound else "") + fmt(d) + (f" ± {100 * std:.2f}" if std is not None and d is not None
                                                          else "")
        gain = "" if bound or b is None or d is None else f"{100 * (d - b):+.2f}"
        t.rows.append([name, fmt(b), cell, gain])

    row("Clean", r["base_clean_accuracy"], r["clean_accuracy"], std=r.get("clean_accuracy_std") if draws > 1 else None)
    for k in keys:
        row(column_label(k) + ("†" if k in surv else ""), r["base_robust_accuracy"].get(k),
            r["robust_accuracy"].get(k) if has_def else None, bound=k in surv,
            why="no gradient" if k in no_grad else None)
    worst_name = "IW-WC" if r.get("mode") == "iw-wc" else "worst case"
    b_worst = r.get("base_worst_case")
    if has_def and r.get("worst_case") is not None and draws > 1:
        t.sections.append(len(t.rows))
        row(f"{worst_name}, mean ± std", b_worst, r["worst_case"], std=r.get("worst_case_std"))
        row(f"{worst_name}, majority vote", b_worst, r.get("worst_case_majority"))
        row(f"{worst_name}, correct in all {draws} draws", b_worst, r.get("worst_case_all_draws"))
        if r.get("beyond_paper"):
            t.sections.append(len(t.rows))
            row(f"{worst_name} of the paper's nine, mean ± std", b_worst, r.get("iw_wc_paper"),
                std=r.get("iw_wc_paper_std"))
            row(f"{worst_name} of the paper's nine, majority vote", b_worst, r.get("iw_wc_paper_majority"))
            row(f"{worst_name} of the paper's nine, all {draws} draws", b_worst, r.get("iw_wc_paper_all_draws"))
    elif b_worst is not None or r.get("worst_case") is not None:
        t.sections.append(len(t.rows))
        row(worst_name, b_worst, r.get("worst_case") if has_def else None)
        if has_def and r.get("beyond_paper"):
            row(f"{worst_name} of the paper's nine", b_worst, r.get("iw_wc_paper"))
    if r.get("beyond_paper"):
        t.notes.append((BEYOND_NOTE if label == "IG-Defense" else BEYOND_NOTE_GENERIC)
                       + f"; {worst_name} is over every column, \"{worst_name} of the paper's nine\" without it.")
    if no_grad:
        t.notes.append(f"no gradient: the defence's output has none ({', '.join(column_label(k) for k in no_grad)} "
                       "follow the gradient and could not run); the worst case rests on the other columns.")
    above = worst_above_column(r)
    if above is not None:
        col, v = above
        t.notes.append(f"{worst_name} ({fmt(r['worst_case'])}) is above the {column_label(col)} column ({fmt(v)}): "
                       f"each image's point is chosen on {draws} selection draws, and near the boundary a choice among "
                       f"{len(keys) + 1 - len(no_grad)} noisy candidates can miss the strongest; more --draws and "
                       "--protocol draws-margin narrow the gap (docs/scoring.md, \"When the worst case is above a "
                       "column\").")
    if surv:
        t.notes.append("† measured only on the images where it could still change the worst case "
                       f"({', '.join(f'{column_label(k)}: {v}' for k, v in surv.items())} images attacked; the "
                       "others count as broken): a lower bound of that attack's own accuracy, so no Δ; the worst "
                       "case is that of --no-skip (every attack gives an image the same point in any batch; "
                       "--no-skip gives every attack's own accuracy).")
    return t


def worst_above_column(r: dict[str, Any]) -> tuple[str, float] | None:
    """(column, accuracy) of the lowest defended column measured on every image when the worst case of a
    randomized defence is above it (per-image selection on noisy draws), else None."""
    if not r.get("defended") or int(r.get("draws") or 1) < 2 or r.get("worst_case") is None:
        return None
    surv = r.get("measured_on_survivors") or {}
    cols = {k: v for k, v in r["robust_accuracy"].items() if v is not None and k not in surv}
    if not cols:
        return None
    k = min(cols, key=cols.get)
    return (k, cols[k]) if r["worst_case"] > cols[k] + 1e-12 else None


def render_table(result: EvalResult | dict[str, Any], console=None, title: str | None = None) -> None:
    """:func:`table_cells` printed as a Rich table, with its notes below."""
    from rich.table import Table

    from .console import out_console

    console = console or out_console
    cells = table_cells(result, title)
    t = Table(title=cells.title, caption=cells.caption, caption_justify="left")
    for i, h in enumerate(cells.headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for i, row in enumerate(cells.rows):
        if i in cells.sections:
            t.add_section()
        t.add_row(*row)
    console.print(t)
    for note in cells.notes:
        console.print(note)


def render_per_class(result: EvalResult | dict[str, Any], console=None) -> None:
    """Class-wise average, best and worst class (the paper's Table 11) for every row (means over draws)."""
    from rich.table import Table

    from .console import out_console

    console = console or out_console
    r = result.to_json() if isinstance(result, EvalResult) else result
    pc = r["per_class"]
    t = Table(title="class-wise accuracy (%)")
    for col in ("row", "class average", "best class", "worst class"):
        t.add_column(col, justify="right" if col != "row" else "left")
    for name, row in pc["rows"].items():
        t.add_row(name, *[("—" if row[k] is None else f"{100 * row[k]:.2f}") for k in ("class_average", "best", "worst")])
    console.print(t)
