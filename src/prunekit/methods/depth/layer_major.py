"""Layer-major scoring of a greedy depth step: every candidate advances through a layer while it is loaded once.

The candidate-major search (``step.run_step``) runs each candidate's suffix of the decoder in turn, so every layer
is used once per candidate: cheap when the model is in memory, one full read of the model per candidate when its
layers come from disk (``models.onloading``). Here the walk goes the other way. Points (attention, MLP) are
visited in order; at each one the current model's stream ("base", the prefix cache of the candidate-major search)
and the stream of every candidate whose first removed point lies behind advance through that branch, by the same
``BranchStack._branch`` calls on the same window batches; a candidate's stream forks from the base at its first
point. Each decoder layer is therefore loaded once per step (counted by the checkpoint when onloaded) and every
score is bit-identical to the candidate-major one, since every stream sees the same operations on the same
numbers. Streams live on the compute device, in host memory or in memory-mapped files (``streams``).

What does not carry over: early abandon and the screened head stop a candidate after some windows; here every
candidate has run every layer on every window before any loss is known, so all candidates are scored completely
(the step's margin is always exact) and the compute is that of the plain prefix-cache search. Carried streams
(reusing last step's suffixes) are not used either.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from prunekit.calibration.store import ActivationStore
from prunekit.distributed import split_map
from prunekit.errors import PrunekitError
from prunekit.methods.depth.stack import BranchStack, Score
from prunekit.methods.depth.step import StepOutcome
from prunekit.methods.depth.units import Unit
from prunekit.models.onloading import onloader_of


def layer_major_scores(stack: BranchStack, units: Sequence[Unit], streams: str = "none",
                       progress: bool = False, desc: str = "layers") -> tuple[float, dict[Unit, Score]]:
    """The current model's NLL sum and, for each unit, the sum with that unit removed too."""
    first_points: dict[int, list[Unit]] = {}
    for unit in units:
        first_points.setdefault(unit.points[0], []).append(unit)
    base = _copy(stack, stack.embedded, streams)
    live: dict[Unit, ActivationStore] = {}
    try:
        for index in tqdm(range(len(stack.layers)), desc=desc, disable=not progress, leave=False):
            with _loaded(stack, index):
                for point in (2 * index, 2 * index + 1):
                    for unit in first_points.get(point, []):
                        live[unit] = _copy(stack, base, streams)  # its stream is the base's up to here
                    if point not in stack.removed:
                        _advance(stack, point, base)
                        for unit, stream in live.items():
                            if point not in unit.points:
                                _advance(stack, point, stream)
        with _head(stack):
            scores = {unit: Score(_nll_sum(stack, stream), stack.num_windows, True) for unit, stream in live.items()}
            return _nll_sum(stack, base), scores
    finally:
        for stream in [base, *live.values()]:
            stream.close()


def layer_major_step(stack: BranchStack, units: Sequence[Unit], streams: str = "none", progress: bool = False,
                     desc: str = "step") -> StepOutcome:
    """One greedy step scored layer-major: the minimum of (NLL sum, canonical key); every score is complete."""
    def share_scores(share: Sequence[Unit]) -> list[Score]:
        scores = layer_major_scores(stack, share, streams, progress, desc)[1]
        return [scores[unit] for unit in share]

    scores = dict(zip(units, split_map(share_scores, units), strict=True))  # candidates split under torchrun
    ordered = sorted(scores, key=lambda unit: (scores[unit].nll_sum, unit.key))
    if not ordered or not math.isfinite(scores[ordered[0]].nll_sum):
        raise PrunekitError("every candidate gives a non-finite calibration loss; the model diverges")
    runner_up = ordered[1] if len(ordered) > 1 else None
    return StepOutcome(ordered[0], scores[ordered[0]].nll_sum, runner_up,
                       scores[runner_up].nll_sum if runner_up else None, True, scores)


def _copy(stack: BranchStack, source: torch.Tensor | ActivationStore, streams: str) -> ActivationStore:
    whole = source if isinstance(source, torch.Tensor) else None
    store = ActivationStore(tuple(stack.embedded.shape), stack.embedded.dtype, stack.embedded.device, streams)
    for rows in stack.batches:
        store.write(rows, whole[rows] if whole is not None else source.read(rows))
    return store


def _advance(stack: BranchStack, point: int, stream: ActivationStore) -> None:
    for rows in stack.batches:
        stream.write(rows, stack._branch(point, stream.read(rows), "branch"))


def _nll_sum(stack: BranchStack, stream: ActivationStore) -> float:
    total = 0.0
    for rows in stack.batches:
        for value in stack._window_nll(stream.read(rows), rows):
            total += value  # window order fixed: the same additions as BranchStack.score
    return total


def _loaded(stack: BranchStack, index: int):
    """Layer ``index`` read from disk for the block when the model is onloaded and some stream runs it."""
    onloader = onloader_of(stack.model)
    if onloader is None or {2 * index, 2 * index + 1} <= stack.removed:
        return nullcontext()
    return _onloaded_layer(onloader, index)


@contextmanager
def _onloaded_layer(onloader, index: int) -> Iterator[None]:
    onloader.onload_layer(index)
    try:
        yield
    finally:
        onloader.release_layer(index)


def _head(stack: BranchStack):
    onloader = onloader_of(stack.model)
    return onloader.head() if onloader is not None else nullcontext()
