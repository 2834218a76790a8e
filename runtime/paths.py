"""Where this project keeps its files, and how a path is shown in logs, reports and model cards."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Downloads, converted weights and remote checkpoints: $PNEUMONIA_CACHE, else ~/.cache/pneumonia."""
    return Path(os.environ.get("PNEUMONIA_CACHE", Path.home() / ".cache" / "pneumonia")).expanduser()


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it lies below or beside it, else with ``~`` for the
    home directory; URIs (s3://...) unchanged."""
    text = str(path)
    if "://" in text:
        return text
    absolute = os.path.abspath(text)
    relative = os.path.relpath(absolute)
    if not relative.startswith(os.path.join(os.pardir, os.pardir)):
        return relative
    home = os.path.expanduser("~")
    return "~" + absolute[len(home):] if absolute.startswith(home + os.sep) else absolute
