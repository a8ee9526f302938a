"""Rich console on stderr and progress bars: stdout is reserved for ``--json`` results."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err_console = Console(stderr=True)
out_console = Console()


def progress_enabled() -> bool:
    return os.environ.get("IGD_NO_PROGRESS") != "1"


@contextmanager
def progress() -> Iterator[Progress]:
    """A Rich progress display on stderr (disabled by ``IGD_NO_PROGRESS=1``)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        disable=not progress_enabled(),
    ) as bar:
        yield bar


def track(iterable, total: int | None = None, description: str = "working"):
    """Iterate with a progress bar; ``total`` is the number of items the iterable yields."""
    with progress() as bar:
        task = bar.add_task(description, total=total)
        for item in iterable:
            yield item
            bar.advance(task)
