"""What the resumable methods (the depth searches, pgprune) share about their state files: the fingerprint that
ties a state to one run, and reading a state back with one-line errors for a damaged file or another run's state.
Writing is ``prunekit._atomic.write_json_atomic`` (an interrupt leaves the previous state intact)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter
from prunekit.models.onloading import onloader_of


def fingerprint(model: nn.Module, adapter: ArchAdapter, windows: TokenWindows, identity: dict[str, Any]) -> str:
    """SHA-256 of the settings that change the result, the model's shapes and weights, and the windows.

    An onloaded model's weights are on disk and are not read for this: its checkpoint's identity (tensor names,
    shards, their sizes and modification times) stands in for them.
    """
    digest = hashlib.sha256()
    header = {"identity": identity, "dense": adapter.describe(), "dtype": str(next(model.parameters()).dtype),
              "windows": list(windows.input_ids.shape)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(_tensor_bytes(windows.input_ids))
    onloader = onloader_of(model)
    if onloader is not None:
        digest.update(onloader.checkpoint.identity().encode())
        return digest.hexdigest()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(_tensor_bytes(parameter))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


def read_state(path: Path | None, what: str, file_format: str, version: int,
               identity: dict[str, Any]) -> dict[str, Any] | None:
    """The state saved at ``path`` (None when there is none), if its format is ``file_format`` / ``version`` and
    every key of ``identity`` (fingerprint, method) matches; ``what`` names it in errors ("search state")."""
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        valid = data.get("format") == file_format and data.get("version") == version
    except (OSError, ValueError, AttributeError):
        valid = False
    if not valid:
        raise PrunekitError(f"{what} {path} is unreadable; delete it to start afresh")
    if any(data.get(key) != value for key, value in identity.items()):
        raise PrunekitError(f"{what} {path} belongs to another run (model, calibration or settings differ); "
                            "delete it or choose another --out")
    return data
