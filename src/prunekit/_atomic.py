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

# Files that mark a directory as written by prunekit: a checkpoint, a uniform export, a converted bundled model.
OUTPUT_MARKERS = ("prunekit.json", "prunekit-export.json", "prunekit-source.json")


def written_by_prunekit(path: Path) -> bool:
    """Whether ``--overwrite`` may replace ``path``: an empty directory or one prunekit wrote (it has a marker)."""
    path = Path(path)
    return path.is_dir() and (not any(path.iterdir()) or any((path / marker).is_file() for marker in OUTPUT_MARKERS))


def check_output_directory(target: str | Path, overwrite: bool = False, flag: str = "--out") -> Path:
    """Fail now, before any work, unless ``target`` can be written: it does not exist (or ``overwrite`` and prunekit
    wrote it), and the nearest existing folder above it accepts new files."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise PrunekitError(f"{flag} {target} is a file, not a directory; choose another path")
    if target.exists() and not overwrite:
        raise PrunekitError(f"{flag} {target} already exists; choose another path or pass --overwrite")
    if target.exists() and not written_by_prunekit(target):
        raise PrunekitError(f"{flag} {target} exists and was not written by prunekit; --overwrite replaces only "
                            "prunekit checkpoints and empty directories, so choose another path")
    _check_writable_folder(target.parent, flag, target)
    return target


def check_output_file(path: str | Path, flag: str = "--json") -> Path:
    """Fail now unless a file can be written at ``path`` (not a directory; its folder accepts new files)."""
    path = Path(path)
    if path.is_dir():
        raise PrunekitError(f"{flag} {path} is a directory; give a file path")
    _check_writable_folder(path.parent, flag, path)
    return path


def _check_writable_folder(folder: Path, flag: str, target: Path) -> None:
    """Try a file in the nearest existing folder at or above ``folder`` (parents are created when writing)."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise PrunekitError(f"{flag} {target}: {existing} is a file, so no folder can be made under it")
    try:
        handle, probe = tempfile.mkstemp(prefix=".prunekit-write-test-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise PrunekitError(f"{flag} {target} cannot be written: {existing} does not accept new files "
                            f"({error.strerror or error})") from None


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``target`` when the block finishes without error.

    ``overwrite`` replaces only a directory prunekit wrote (or an empty one); anything else is refused.
    """
    target = check_output_directory(target, overwrite, flag="output directory")
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


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = None, default: Any = None,
                      allow_nan: bool = False) -> Path:
    """Write ``payload`` as JSON to ``path``: the old file stays intact until the new one is complete.

    Non-finite floats are refused unless ``allow_nan`` (states are strict JSON; reports may carry a NaN).
    """
    text = json.dumps(payload, indent=indent, allow_nan=allow_nan, default=default) + "\n"
    return write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path``: the old file stays intact until the new one is complete."""
    with atomic_file(path) as staging:
        staging.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(handle)
    try:
        yield Path(staging)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
