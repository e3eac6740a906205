"""Where the demo lives on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CONSTELLATION_CACHE``, else ``$XDG_CACHE_HOME/constellation``, else ``~/.cache/constellation``."""
    if os.environ.get("CONSTELLATION_CACHE"):
        return Path(os.environ["CONSTELLATION_CACHE"]).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(base) / "constellation").resolve()
