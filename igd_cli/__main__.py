"""``python -m igd_cli`` runs the ``igd`` command line."""

from .cli import run

run()
