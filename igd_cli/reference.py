"""The command reference (``docs/reference.md``): every command's ``--help``, generated from the Typer app, so the
page cannot drift from the code (``tests/test_docs.py`` regenerates and compares it).

Regenerate with ``python -m igd_cli.reference > docs/reference.md``.
"""

from __future__ import annotations

import typer

#: the width the help is rendered at (wide enough that option help keeps its lines)
WIDTH = 110


def _commands(group, prefix: str) -> list[tuple[str, object]]:
    out = []
    for name in sorted(group.commands):
        cmd = group.commands[name]
        full = f"{prefix} {name}"
        out.append((full, cmd))
        if getattr(cmd, "commands", None):  # a group (Typer vendors its own click: no isinstance)
            out += _commands(cmd, full)
    return out


def cli_reference() -> str:
    """Markdown: a section per command (subcommands included) with its one-line summary and full ``--help``."""
    from .cli import app
    from .commands import register_all

    register_all()
    root = typer.main.get_command(app)
    lines = ["# Command reference", "",
             "Generated from the code by `python -m igd_cli.reference` (a test checks it is current). "
             "Every command also prints this with `--help`.", ""]
    for full, cmd in _commands(root, "igd"):
        ctx = cmd.context_class(cmd, info_name=full, terminal_width=WIDTH, max_content_width=WIDTH)
        summary = (cmd.short_help or (cmd.help or "").strip().splitlines()[0] if (cmd.short_help or cmd.help) else "")
        lines += [f"## {full}", "", summary, "", "```text", cmd.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(cli_reference(), end="")
