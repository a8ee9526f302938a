"""igd's home folder (``$IGD_HOME``, default ``~/.cache/igd``) and the caches it holds, named in one place.

A leaf module: it imports nothing from igd, so every module that keeps something under the home (artifacts' digest
cache, the model registry, data sets, attack sets, the CLIP cache) can name its folder without importing another.

>>> model_dir() == igd_home() / "models"
True
"""

from __future__ import annotations

import os
from pathlib import Path


def igd_home() -> Path:
    """Root of igd's caches (``$IGD_HOME``, default ``~/.cache/igd``), read from the environment at every call."""
    return Path(os.environ.get("IGD_HOME", Path.home() / ".cache" / "igd")).expanduser()


def model_dir() -> Path:
    """RobustBench zoo checkpoints: ``$IGD_HOME/models/<dataset>/<threat model>/<name>.pt``."""
    return igd_home() / "models"


def data_home() -> Path:
    """Data sets when neither ``--data-dir`` nor ``$IGD_DATA_DIR`` says where: ``$IGD_HOME/data``."""
    return igd_home() / "data"


def adv_home() -> Path:
    """Attack sets kept for reuse when no ``--workdir`` is given: ``$IGD_HOME/adv/<model fingerprint>``."""
    return igd_home() / "adv"


def clip_cache_home() -> Path:
    """CD-IR's CLIP embeddings when no ``--clip-cache`` is given: ``$IGD_HOME/clip-cache``."""
    return igd_home() / "clip-cache"


def digest_store() -> Path:
    """The remembered sha256 of large files (by path, size and mtime): ``$IGD_HOME/cache/sha256.json``."""
    return igd_home() / "cache" / "sha256.json"
