"""Write a directory atomically: build it under a temporary name beside the target, then rename.

A crash or Ctrl-C while writing leaves only a ``.tmp-*`` directory that nothing ever loads, never a half-written
target.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prunekit.errors import PrunekitError


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` when the block finishes without error."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise PrunekitError(f"output directory {target} already exists; choose another path or remove it first")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
