"""User-facing errors: the CLI prints them as one ``error: ...`` line and exits with code 2."""

from __future__ import annotations


class IgdError(Exception):
    """A problem with the user's input or environment (bad file, unknown name, offline download...).

    Example::

        try:
            igd_cli.open_target("no-such-model")
        except igd_cli.IgdError as exc:
            print(exc)          # one line saying what is wrong
    """


def one_line(text: str) -> str:
    """Collapse a message to a single line so that every user error stays one line on stderr."""
    return " ".join(str(text).split())
