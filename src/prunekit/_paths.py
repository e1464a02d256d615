"""Where prunekit keeps converted models and other derived files."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder: ``$PRUNEKIT_CACHE`` if set, else ``~/.cache/prunekit``."""
    configured = os.environ.get("PRUNEKIT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "prunekit"
