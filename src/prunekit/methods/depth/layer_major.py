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

Where the speed-ups still apply: at the head. Every candidate has run every layer on every window before any loss
is known, so nothing is saved in the decoder (its compute is that of the plain prefix-cache search), but the heads
run candidate after candidate, in the previous step's ranking, with the candidate-major search's early abandon and
screened head (``BranchStack.score_finals``): a candidate whose running sum, or exact sums plus the screened lower
bounds of its other windows, exceeds the best complete sum stops there. The head of a 135M model costs as much as
about seven of its layers per window, so this saves a good part of a step. Carried streams (reusing last step's
suffixes) do not apply: every stream is rebuilt from the walk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from tqdm.auto import tqdm

from prunekit.calibration.store import ActivationStore
from prunekit.distributed import split_map
from prunekit.methods.depth.stack import BranchStack, Score
from prunekit.methods.depth.step import StepOutcome, score_in_order, step_outcome
from prunekit.methods.depth.units import Unit
from prunekit.models.onloading import onloader_of


def layer_major_scores(stack: BranchStack, units: Sequence[Unit], streams: str = "none",
                       abandon_bound: str | None = None, progress: bool = False,
                       desc: str = "layers") -> tuple[float, dict[Unit, Score]]:
    """The current model's NLL sum and, for each unit, the sum with that unit removed too (units in the order
    their heads run; with ``abandon_bound``, partial scores for the units abandoned at the head)."""
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
            base_sum = stack.score_finals(_reader(stack, base)).nll_sum
            if units and stack.screen_topk and abandon_bound is not None:
                stack.build_screens(_reader(stack, base))

            def score_one(unit: Unit, bound: float, *_) -> Score:
                return stack.score_finals(_reader(stack, live[unit]), bound)

            return base_sum, dict(zip(units, score_in_order(units, abandon_bound, score_one), strict=True))
    finally:
        for stream in [base, *live.values()]:
            stream.close()


def layer_major_step(stack: BranchStack, units: Sequence[Unit], streams: str = "none",
                     abandon_bound: str | None = None, progress: bool = False, desc: str = "step") -> StepOutcome:
    """One greedy step scored layer-major: the minimum of (NLL sum, canonical key), as :func:`step.run_step`."""
    def share_scores(share: Sequence[Unit]) -> list[Score]:
        scores = layer_major_scores(stack, share, streams, abandon_bound, progress, desc)[1]
        return [scores[unit] for unit in share]

    scores = dict(zip(units, split_map(share_scores, units), strict=True))  # candidates split under torchrun
    return step_outcome(scores)


def _reader(stack: BranchStack, stream: ActivationStore) -> Callable[[int], torch.Tensor]:
    return lambda index: stream.read(stack.batches[index])


def _copy(stack: BranchStack, source: torch.Tensor | ActivationStore, streams: str) -> ActivationStore:
    whole = source if isinstance(source, torch.Tensor) else None
    store = ActivationStore(tuple(stack.embedded.shape), stack.embedded.dtype, stack.embedded.device, streams)
    for rows in stack.batches:
        store.write(rows, whole[rows] if whole is not None else source.read(rows))
    return store


def _advance(stack: BranchStack, point: int, stream: ActivationStore) -> None:
    for rows in stack.batches:
        stream.write(rows, stack._branch(point, stream.read(rows), "branch"))


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
