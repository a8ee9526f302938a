"""Import shims for third-party packages; import robustbench only through :func:`import_robustbench`."""

from __future__ import annotations

import importlib
import os
import sys
import warnings


def offline_guards() -> None:
    """Make hub clients fail at once instead of retrying for tens of seconds when there is no network.

    Set only when the user did not choose otherwise; ``IGD_ONLINE=1`` leaves the hubs online.
    """
    if os.environ.get("IGD_ONLINE") == "1":
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "2")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")


def alias_autoattack() -> None:
    """robustbench 1.1.1 does ``from autoattack import AutoAttack`` but its dependency ``pyautoattack``
    installs the module under the name ``pyautoattack``: register it under the old name once, here."""
    if "autoattack" not in sys.modules:
        pyautoattack = importlib.import_module("pyautoattack")
        sys.modules["autoattack"] = pyautoattack
        for sub in ("autopgd_base", "square", "fab_pt", "fab_base", "other_utils", "state", "checks"):
            try:
                sys.modules.setdefault(f"autoattack.{sub}", importlib.import_module(f"pyautoattack.{sub}"))
            except ImportError:  # pragma: no cover - optional submodules of other versions
                pass


def import_robustbench():
    """Import robustbench with the autoattack alias in place and its import-time warnings silenced."""
    alias_autoattack()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import robustbench  # noqa: F401
        import robustbench.utils  # noqa: F401
    return sys.modules["robustbench"]


def reachable(url_or_host: str, timeout: float = 3.0) -> bool:
    """Whether a download host resolves and accepts a connection: checked before a download so that an
    offline machine fails at once with one clear line instead of printing a doomed download.

    ``IGD_OFFLINE=1`` answers False without asking the network.
    """
    import socket
    from urllib.parse import urlparse

    if os.environ.get("IGD_OFFLINE") == "1":
        return False
    host = urlparse(url_or_host).hostname if "://" in url_or_host else url_or_host
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
