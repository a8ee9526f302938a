"""``igd report RUN_DIR [--out FILE.md]``: one Markdown page per run folder (:mod:`igd_cli.run_report`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cli import ArgCommand, app, emit, examples
from ..console import out_console
from ..options import Json
from ..run_report import write_run_report


@app.command("report", short_help="one Markdown page of a run folder: tables, plots, timings", epilog=examples(
    "igd report runs/demo"), cls=ArgCommand)
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder: igd pipeline --out, igd analyze --out")],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="FILE", help="the Markdown file (default RUN_DIR/report.md)")] = None,
    as_json: Json = False,
) -> None:
    """Write one Markdown page for a run folder: setup and provenance, calibration, the base-vs-defended tables,
    the analyses, every plot embedded, timings. Built from the folder's files only (nothing is recomputed)."""
    emit(write_run_report(run_dir, out), as_json, _render)


def _render(r: dict) -> None:
    out_console.print(f"report -> {r['out']}: {len(r['tables'])} tables, {len(r['plots'])} plots")
