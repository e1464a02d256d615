"""The resumable state of a depth search: its finished steps, saved atomically after every step.

With a state path the finished steps are written together with a fingerprint of the weights, the calibration
windows and the settings that change the schedule; a rerun with the same fingerprint continues from the last
finished step and yields the same schedule (scores are deterministic and the prefix cache is a pure function of the
removal set). The schedule is nested, so the target (``blocks`` / ratio) is not part of the fingerprint: a rerun
with a larger target extends the search. Caveat: on a loaded machine a multi-threaded BLAS has been seen to change
the last bits of a score between processes (3e-8 relative on SmolLM2), which could only flip a near-exact tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit._atomic import write_json_atomic
from prunekit.distributed import leader
from prunekit.methods.depth.units import Unit
from prunekit.methods.run_state import read_state

STATE_FORMAT, STATE_VERSION = "prunekit-depth-search-state", 1


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
        data = read_state(path, "search state", STATE_FORMAT, STATE_VERSION,
                          {"method": method, "fingerprint": print_})
        if data is None:
            return state
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
        if self.path is None or not leader():  # under torchrun one process keeps the state
            return
        body = {"format": STATE_FORMAT, "version": STATE_VERSION, "method": self.method,
                "fingerprint": self.fingerprint, "dense": self.dense, "steps": self.steps,
                "resumed_at": self.resumed_at}
        write_json_atomic(self.path, body)  # an interrupt leaves the previous step's state intact
