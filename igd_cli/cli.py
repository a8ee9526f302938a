"""The ``igd`` command line: parse options, call the library, render results. No algorithm lives here.

Every user error prints one ``error: ...`` line on stderr and exits 2 (``IGD_DEBUG=1`` shows the traceback);
``--json`` prints exactly one JSON object on stdout, progress and logs go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Callable

import typer
import typer.core

from . import __version__
from ._compat import offline_guards
from .errors import IgdError, one_line

# typer >= 0.20 vendors click: take its exception classes from typer, whichever click it uses.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def examples(*lines: str) -> str:
    """The epilog of a command's ``--help``: its examples, one ``igd …`` command per line, kept as written (click's
    ``\\b`` stops it from rewrapping them). ``python -m igd_cli.reference`` copies them into docs/reference.md.

    Example: ``@app.command("inspect", epilog=examples("igd inspect mask.safetensors"))``
    """
    assert all(line.startswith("igd ") for line in lines), lines
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="IG-Defense: interpretability-guided test-time adversarial defence (ECCV 2024).",
                  epilog=examples("igd pipeline --model demo --preset quick --n-examples 50 --out runs/demo",
                                  "igd rank --help"))


class ArgCommand(typer.core.TyperCommand):
    """A command whose positional arguments show their metavar alone in ``--help`` (Typer appends the Python type:
    ``FILE <path>``, ``SHARD <list[Path]>``). Use ``@app.command(..., cls=ArgCommand)`` with ``metavar=`` set."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        for p in self.params:
            if p.param_type_name == "argument" and p.metavar:
                p.display_type_rich = lambda ctx: None  # shadows Typer's method on this parameter only
        super().format_options(ctx, formatter)


def emit(result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Print the result: one JSON object on stdout with ``--json``, else a human rendering on stderr/stdout."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=_json_default) + "\n")
        sys.stdout.flush()
    elif render is not None:
        render(result)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"igd {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                                help="print the igd version and exit")] = False) -> None:
    """IG-Defense: interpretability-guided test-time adversarial defence (ECCV 2024)."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (0 ok, 2 user error, 1 internal error)."""
    offline_guards()
    from .commands import register_all

    register_all()
    debug = os.environ.get("IGD_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        command.main(args=argv if argv is not None else sys.argv[1:], prog_name="igd", standalone_mode=False)
        return 0
    except IgdError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except _ClickException as exc:  # usage errors: bad option values, missing arguments
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `igd` or `igd CMD` with no arguments: show help
            print(exc.format_message())
            return 0
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc.format_message())}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run() -> None:  # pragma: no cover - used by the console script
    sys.exit(main())
