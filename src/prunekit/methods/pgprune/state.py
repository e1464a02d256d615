"""The resumable state of a policy-gradient run, saved atomically every ``save_every`` steps.

Everything the next step depends on is in it: the probabilities, the EMA baseline, the number of finished steps and
the init scores (the final top-k's tie-break). Masks and mini-batches are drawn from generators seeded by (seed,
step) and (seed, epoch), so no random-generator state needs saving: a run killed after step n and rerun continues
with exactly the draws an uninterrupted run makes, and ends with the same probabilities. The fingerprint (weights,
calibration windows, settings that change the result) refuses a state from another run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunekit._atomic import write_json_atomic
from prunekit.distributed import leader
from prunekit.methods.run_state import read_state

STATE_FORMAT, STATE_VERSION = "prunekit-pgprune-state", 1


@dataclass
class LearningState:
    """Where learning stands; ``history`` has one record per finished step, ``evaluations`` one per held-out
    evaluation."""

    probabilities: dict[str, torch.Tensor]
    tie_scores: dict[str, torch.Tensor]
    initial: dict[str, torch.Tensor]  # the probabilities learning started from (the init mask is their top-k)
    step: int = 0
    baseline: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # learning time over every session of this run
    resumed_at: list[int] = field(default_factory=list)

    def save(self, path: Path | None, fingerprint: str) -> None:
        if path is None or not leader():  # under torchrun one process keeps the state
            return
        body = {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": fingerprint, "step": self.step,
                "baseline": self.baseline, "seconds": self.seconds, "resumed_at": self.resumed_at,
                "probabilities": _lists(self.probabilities), "tie_scores": _lists(self.tie_scores),
                "initial": _lists(self.initial),
                "history": self.history, "evaluations": self.evaluations}
        write_json_atomic(path, body)

    @classmethod
    def load(cls, path: Path | None, fingerprint: str) -> LearningState | None:
        """The saved state of this run, or None when there is none; a one-line error for another run's."""
        data = read_state(path, "pgprune state", STATE_FORMAT, STATE_VERSION, {"fingerprint": fingerprint})
        if data is None:
            return None
        return cls(_tensors(data["probabilities"]), _tensors(data["tie_scores"]), _tensors(data["initial"]),
                   data["step"], data["baseline"],
                   data["history"], data["evaluations"], data["seconds"], data["resumed_at"] + [data["step"]])


def _lists(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    return {kind: values.tolist() for kind, values in tensors.items()}


def _tensors(lists: dict[str, list]) -> dict[str, torch.Tensor]:
    return {kind: torch.tensor(values, dtype=torch.float32) for kind, values in lists.items()}
