"""The resumable state of a depth search: its finished steps, saved atomically after every step.

With a state path the finished steps are written together with a fingerprint of the weights, the calibration
windows and the settings that change the schedule; a rerun with the same fingerprint continues from the last
finished step and yields the same schedule (scores are deterministic and the prefix cache is a pure function of the
removal set). The schedule is nested, so the target (``blocks`` / ratio) is not part of the fingerprint: a rerun
with a larger target extends the search. Caveat: on a loaded machine a multi-threaded BLAS has been seen to change
the last bits of a score between processes (3e-8 relative on SmolLM2), which could only flip a near-exact tie.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit._atomic import write_json_atomic
from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.methods.depth.units import Unit
from prunekit.models.adapters import ArchAdapter

STATE_FORMAT, STATE_VERSION = "prunekit-depth-search-state", 1


def fingerprint(model: nn.Module, adapter: ArchAdapter, windows: TokenWindows, identity: dict[str, Any]) -> str:
    """SHA-256 of the settings that change the schedule, the model's shapes and weights, and the windows."""
    digest = hashlib.sha256()
    header = {"identity": identity, "dense": adapter.describe(), "dtype": str(next(model.parameters()).dtype),
              "windows": list(windows.input_ids.shape)}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(_tensor_bytes(windows.input_ids))
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(_tensor_bytes(parameter))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1).contiguous().cpu()
    return memoryview(flat.view(torch.uint8).numpy())


@dataclass
class SearchState:
    """The finished steps of one search; saved after every step when it has a path."""

    path: Path | None
    fingerprint: str | None
    method: str
    dense: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    resumed_at: list[int] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path | None, method: str, print_: str | None) -> SearchState:
        """A fresh state, or the one saved at ``path`` when it belongs to the same run."""
        state = cls(path, print_, method)
        if path is None or not path.exists():
            return state
        try:
            data = json.loads(path.read_text())
            valid = data.get("format") == STATE_FORMAT and data.get("version") == STATE_VERSION
        except (OSError, ValueError, AttributeError):
            valid = False
        if not valid:
            raise PrunekitError(f"search state {path} is unreadable; delete it to start the search afresh")
        if data.get("method") != method or data.get("fingerprint") != print_:
            raise PrunekitError(f"search state {path} belongs to another run (model, calibration or settings differ); "
                                "delete it or choose another --out")
        state.dense, state.steps = data["dense"], list(data["steps"])
        state.resumed_at = list(data.get("resumed_at", [])) + [len(state.steps)]
        return state

    def units(self) -> list[Unit]:
        return [Unit.from_label(step["unit"]) for step in self.steps]

    def ratios(self) -> list[tuple[float, float]]:
        """(ratio_all, ratio_layers) after 0, 1, 2, ... removals."""
        return [(0.0, 0.0)] + [(step["ratio_all"], step["ratio_layers"]) for step in self.steps]

    def ranking(self) -> list[Unit] | None:
        return [Unit.from_label(label) for label in self.steps[-1]["ranking"]] if self.steps else None

    def save(self) -> None:
        if self.path is None:
            return
        body = {"format": STATE_FORMAT, "version": STATE_VERSION, "method": self.method,
                "fingerprint": self.fingerprint, "dense": self.dense, "steps": self.steps,
                "resumed_at": self.resumed_at}
        write_json_atomic(self.path, body)  # an interrupt leaves the previous step's state intact
