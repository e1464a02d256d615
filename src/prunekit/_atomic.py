"""Atomic writes: a directory built under a temporary name beside the target, a JSON file written beside its
target; each renamed into place at the end.

A crash or Ctrl-C while writing leaves only a ``.tmp-*`` name that nothing ever loads, never a half-written target;
every resumable state (depth searches now, policy-gradient and ``compare`` next) is written this way.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = None, default: Any = None) -> Path:
    """Write ``payload`` as JSON to ``path``: the old file stays intact until the new one is complete.

    Non-finite floats are refused (``allow_nan=False``), so every file is strict JSON.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=indent, allow_nan=False, default=default) + "\n"
    handle, staging = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    return path
