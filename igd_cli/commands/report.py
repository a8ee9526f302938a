"""``igd report RUN_DIR [--out FILE.md] [--model-info FILE.json]``: one Markdown page per run folder
(:mod:`igd_cli.run_report`), and RobustBench-style results of its evaluation or of one eval report
(:mod:`igd_cli.leaderboard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cli import ArgCommand, app, emit, examples
from ..console import out_console
from ..errors import IgdError
from ..leaderboard import eval_report_path, write_model_info
from ..options import Json
from ..run_report import write_run_report


@app.command("report", short_help="one Markdown page of a run folder; RobustBench-style model info",
             epilog=examples("igd report runs/demo",
                             "igd report runs/demo --model-info runs/demo/model-info.json"), cls=ArgCommand)
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="a run folder: igd pipeline --out, igd analyze --out; "
                                            "with --model-info also an eval report (igd defend-eval --report)")],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="FILE", help="the Markdown file (default RUN_DIR/report.md)")] = None,
    model_info: Annotated[Optional[Path], typer.Option("--model-info", metavar="FILE", help="also write the evaluation's "
                                                       "results as a RobustBench model-info JSON file (clean and robust "
                                                       "accuracy, ε, threat model, what was evaluated and how)")] = None,
    as_json: Json = False,
) -> None:
    """Write one Markdown page for a run folder: setup and provenance, calibration, the base-vs-defended tables,
    the analyses, every plot embedded, timings. Built from the folder's files only (nothing is recomputed).

    --model-info FILE.json writes the run's evaluation (its IW-WC eval report) in the format of RobustBench's
    model_info files; given an eval report instead of a folder, only that file is written."""
    if run_dir.is_file():
        if model_info is None:
            raise IgdError(f"{run_dir}: a file: the Markdown page is of a run folder; pass --model-info FILE.json to "
                           "write this eval report's model info")
        if out is not None:
            raise IgdError("--out: the Markdown page is of a run folder, not of one eval report")
        result: dict = {"run_dir": None, "out": None, "tables": [], "plots": []}
    else:
        if model_info is not None:
            eval_report_path(run_dir)  # a folder without (or with several) eval reports: one line, nothing written
        result = write_run_report(run_dir, out)
    if model_info is not None:
        info = write_model_info(run_dir, model_info)
        result.update({"model_info": str(model_info), "eval_report": info["igd"]["eval_report"]["file"]})
    emit(result, as_json, _render)


def _render(r: dict) -> None:
    if r["out"] is not None:
        out_console.print(f"report -> {r['out']}: {len(r['tables'])} tables, {len(r['plots'])} plots")
    if "model_info" in r:
        out_console.print(f"model info ({r['eval_report']}) -> {r['model_info']}")
