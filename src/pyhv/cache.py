"""Where pyhv keeps what it can rebuild: downloaded packages, extracted kernels, guests."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pyhv`` or ``~/.cache/pyhv`` (a relative XDG value is invalid per
    the XDG spec and ignored)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "pyhv"
