"""The decoder as 2L residual branches over fixed calibration windows: the engine of the greedy depth searches.

A candidate removing a unit is scored by the NLL sum of the calibration windows with that unit removed too. Speed-ups
(method spec ``blockpruner.md`` section 5), none of which changes a score:

1. *Prefix cache*: for the current removal set, the residual entering every branch point, for all windows. A unit
   starting at point p only runs points p..2L-1 and the head. The cache is computed with the same window batches and
   the same ops as a run from the embeddings, so candidate scores are bit-identical to a plain run (the tests compare
   them with ``==``). After a removal at p it is refreshed from p on.
2. *Early abandon*: window NLL sums are >= 0 and adding a non-negative float never decreases a float sum (rounding
   is monotone), so a running sum is a lower bound of the candidate's total; once it exceeds the search's bound the
   candidate is dropped (``Score.complete`` False).
3. *Screened head* (``screen_topk`` > 0): per window, a lower bound of the NLL from a vocabulary subset
   (:mod:`~prunekit.methods.depth.screen`) drops a candidate before the full LM head runs, and exact sums so far
   plus the bounds of the rest drop it as soon as they exceed the search's bound.
4. *Carried streams* (``carry_mb`` > 0): a candidate removing unit c (first point p) runs points p, p+1, ... and
   passes the residual entering every later point P. After the step removes the winner at point w, the next step's
   model with c removed too has the same removal set below w, so for P <= w the residual entering P is the same
   tensor, bit for bit. While a candidate runs, its residual is kept at the first point of the unit after c most
   likely to win; in the next step the candidate starts from the kept residual at the largest valid P instead of
   from p. Kept residuals stay valid as long as every later removal lies at or after P, and their memory is capped
   by ``carry_mb`` (the earliest captures win when the cap is reached).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.calibration.branches import attention_branch, head_logits, mlp_branch
from prunekit.calibration.runner import LayerwiseRunner
from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.evaluation.perplexity import window_nll_sums
from prunekit.methods.depth.screen import HeadScreen
from prunekit.methods.depth.units import Unit
from prunekit.models.adapters import ArchAdapter


@dataclass(frozen=True)
class Score:
    """A candidate's NLL sum over its first ``windows`` windows (all of them when ``complete``)."""

    nll_sum: float
    windows: int
    complete: bool


class BranchStack:
    """The decoder as 2L residual branches over fixed calibration windows, with an optional prefix cache.

    ``points[p]`` (cache on) is the residual entering branch p for every window under the current removal set;
    ``points[2L]`` is the stream entering the final norm. Removed branches share their input's tensor. Memory:
    at most (2L + 1) x tokens x d in the model dtype (SmolLM2, 8,192 tokens, fp32: about 1.1 GB).
    ``counts`` tallies branch and head runs per window: ``branch`` while scoring, ``cache`` while (re)building,
    ``head`` for full LM-head runs and ``screen`` for screened lower bounds; ``carry`` counts windows started from
    a carried stream. ``screen_topk`` turns on the screened head (module docstring, point 3; its vocabulary subsets
    come from the prefix cache, or from :meth:`build_screens` in the layer-major search);
    ``carry_mb`` (needs the cache) the carried streams (point 4).
    """

    def __init__(self, model: nn.Module, adapter: ArchAdapter, windows: TokenWindows, batch_size: int,
                 cache: bool, progress: bool = True, screen_topk: int = 0, carry_mb: int = 0):
        self.model, self.adapter, self.use_cache = model, adapter, cache
        self.screen_topk = screen_topk
        self.carry_bytes = carry_mb * 2**20 if cache else 0
        # unit -> batch index -> [(point, residual entering it)]: captured in this step (valid for this removal set)
        self._captured: dict[Unit, dict[int, list[tuple[int, torch.Tensor]]]] = {}
        # unit -> batch index -> (point, residual entering it): still valid for the current removal set
        self._carried: dict[Unit, dict[int, tuple[int, torch.Tensor]]] = {}
        self._kept_bytes = 0
        self._screens: list[HeadScreen] | None = None
        self.layers = adapter.decoder_layers(model)
        self.num_points = 2 * len(self.layers)
        self.input_ids = windows.input_ids
        self.num_windows = windows.num_windows
        self.scored_tokens = windows.num_windows * (windows.seqlen - 1)
        with LayerwiseRunner(model, adapter, windows, batch_size=batch_size, progress=progress) as runner:
            self.batches = runner.batches()
            sizes = {rows.stop - rows.start for rows in self.batches}
            self.contexts = {size: [runner.context(i, size) for i in range(len(self.layers))] for size in sizes}
            self.embedded = runner.inputs.tensor()  # layer-0 inputs (the runner's store is freed on close)
        self.removed: frozenset[int] = frozenset()
        self.points: list[torch.Tensor | None] = [self.embedded] + [None] * self.num_points
        self.counts = {"branch": 0, "head": 0, "cache": 0, "screen": 0, "carry": 0}

    def set_removed(self, points: Iterable[int]) -> None:
        """Make ``points`` the removal set; with the cache, recompute it from the first point that changed."""
        new = frozenset(points)
        changed = min(new ^ self.removed, default=None)
        grew = new >= self.removed
        self.removed = new
        if changed is not None:
            self._screens = None
            self._carry_over(changed if grew else -1)
        if self.use_cache:
            built = self.points[-1] is not None
            if not built or changed is not None:
                self._refresh(changed if built else 0)

    def _refresh(self, start: int) -> None:
        for point in range(start + 1, self.num_points + 1):
            self.points[point] = None  # free the stale tensors before allocating new ones
        for point in range(start, self.num_points):
            source = self.points[point]
            if point in self.removed:
                self.points[point + 1] = source
                continue
            target = torch.empty_like(source)
            for rows in self.batches:
                target[rows] = self._branch(point, source[rows], "cache")
            self.points[point + 1] = target

    def _branch(self, point: int, hidden: torch.Tensor, counter: str) -> torch.Tensor:
        size = hidden.shape[0]
        self.counts[counter] += size
        layer = self.layers[point // 2]
        if point % 2 == 0:
            return attention_branch(self.adapter, layer, hidden, self.contexts[size][point // 2])
        return mlp_branch(self.adapter, layer, hidden)

    def _window_nll(self, hidden: torch.Tensor, rows: slice) -> list[float]:
        logits = head_logits(self.model, hidden)
        self.counts["head"] += hidden.shape[0]
        sums = window_nll_sums(logits, self.input_ids[rows].to(logits.device)).double().tolist()
        # A diverging candidate (non-finite loss) scores +inf: it loses to any finite one and is never chosen.
        return [value if math.isfinite(value) else math.inf for value in sums]

    def _suffix(self, start: int, hidden: torch.Tensor, skip: frozenset[int],
                keep: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        for point in range(start, self.num_points):
            if keep is not None:
                keep(point, hidden)
            if point not in skip:
                hidden = self._branch(point, hidden, "branch")
        return hidden

    def _run(self, unit: Unit | None, index: int, skip: frozenset[int], capture: frozenset[int]) -> torch.Tensor:
        """The stream entering the head for batch ``index``, from the latest exact starting point available."""
        rows = self.batches[index]
        if not self.use_cache:
            return self._suffix(0, self.embedded[rows], skip)
        if unit is None:
            return self.points[self.num_points][rows]
        carried = self._carried.get(unit, {}).get(index)
        if carried is not None:
            self.counts["carry"] += rows.stop - rows.start
        start, hidden = carried or (unit.points[0], self.points[unit.points[0]][rows])

        def keep(point: int, stream: torch.Tensor) -> None:
            if point in capture and stream is not hidden:  # no branch run since the start: nothing to save
                self._capture(unit, index, point, stream)

        return self._suffix(start, hidden, skip, keep if capture else None)

    def first_branch(self, unit: Unit) -> int:
        """The first branch point a candidate removing ``unit`` runs (``num_points``: none)."""
        skip = self.removed.union(unit.points)
        return next((p for p in range(unit.points[0], self.num_points) if p not in skip), self.num_points)

    def _capture(self, unit: Unit, index: int, point: int, stream: torch.Tensor) -> None:
        if self._kept_bytes + stream.nbytes <= self.carry_bytes:
            # a copy: a view of a prefix-cache row would keep the whole cache tensor alive after a refresh
            self._captured.setdefault(unit, {}).setdefault(index, []).append((point, stream.clone()))
            self._kept_bytes += stream.nbytes

    def _carry_over(self, changed: int) -> None:
        """Keep, per unit and batch, the stream at the largest point not after ``changed`` (-1: drop them all)."""
        merged: dict[Unit, dict[int, tuple[int, torch.Tensor]]] = {}
        pending = [(unit, index, [kept]) for unit, batches in self._carried.items() for index, kept in batches.items()]
        pending += [(unit, index, kept) for unit, batches in self._captured.items() for index, kept in batches.items()]
        for unit, index, kept in pending:
            if self.removed.intersection(unit.points):
                continue  # removed now: never scored again
            for point, stream in kept:
                current = merged.setdefault(unit, {}).get(index)
                if point <= changed and (current is None or point > current[0]):
                    merged[unit][index] = (point, stream)
        self._carried = {unit: batches for unit, batches in merged.items() if batches}
        self._captured = {}
        self._kept_bytes = sum(stream.nbytes for batches in self._carried.values() for _, stream in batches.values())

    def score(self, unit: Unit | None = None, bound: float = math.inf, capture: Iterable[int] = ()) -> Score:
        """NLL sum of the current model with ``unit`` removed too (None: as is); stops once the sum exceeds ``bound``.

        ``capture``: points at which to keep this candidate's residual for the next step (when carrying is on).
        """
        skip = self.removed | frozenset(unit.points if unit is not None else ())
        capture = frozenset(capture) if self.carry_bytes and unit is not None else frozenset()
        return self.score_finals(lambda index: self._run(unit, index, skip, capture), bound)

    def score_finals(self, final_of: Callable[[int], torch.Tensor], bound: float = math.inf) -> Score:
        """NLL sum of the streams entering the head, ``final_of(batch index)``, stopping once it exceeds ``bound``
        (with the screened head when it is on and the bound finite). The layer-major search gives its streams."""
        if self.screen_topk and math.isfinite(bound):
            return self._screened_score(final_of, bound)
        total, done = 0.0, 0
        for index, rows in enumerate(self.batches):
            for value in self._window_nll(final_of(index), rows):
                total += value  # window order is fixed, so every mode adds the same numbers in the same order
            done = rows.stop
            if total > bound and done < self.num_windows:
                break
        return Score(total, done, done == self.num_windows)

    def _screened_score(self, final_of: Callable[[int], torch.Tensor], bound: float) -> Score:
        """:meth:`score_finals` with the screened head: lower bounds first, exact sums only while the bound may
        hold."""
        screens = self._head_screens()
        finals: list[torch.Tensor] = []
        lower: list[float] = []
        for index, (rows, screen) in enumerate(zip(self.batches, screens, strict=True)):
            finals.append(final_of(index))
            lower.extend(screen.lower_bounds(self.model, finals[-1]))
            self.counts["screen"] += rows.stop - rows.start
            if math.fsum(lower) > bound:
                return Score(math.fsum(lower), rows.stop, False)
        total = 0.0
        for rows, hidden in zip(self.batches, finals, strict=True):
            for value in self._window_nll(hidden, rows):
                total += value  # the same numbers in the same order as the unscreened path
            rest = math.fsum(lower[rows.stop:])
            if rows.stop < self.num_windows and total + rest > bound:
                return Score(total + rest, self.num_windows, False)
        return Score(total, self.num_windows, True)

    def _head_screens(self) -> list[HeadScreen]:
        """Per batch, the vocabulary subset from the current model's logits (built once per removal set)."""
        if self._screens is None:
            if not self.use_cache:
                raise PrunekitError("the screened head needs the prefix cache or screens built by the caller")
            self.build_screens(lambda index: self.points[self.num_points][self.batches[index]])
        return self._screens

    def build_screens(self, current_final: Callable[[int], torch.Tensor]) -> None:
        """The screened head's vocabulary subsets from the current model's stream entering the head
        (``current_final(batch index)``, as in :meth:`score_finals`); they hold until the removal set changes."""
        screens = []
        for index, rows in enumerate(self.batches):
            self.counts["head"] += rows.stop - rows.start
            logits = head_logits(self.model, current_final(index))
            screens.append(HeadScreen.build(logits, self.input_ids[rows], self.screen_topk))
        self._screens = screens

    def ppl(self, nll_sum: float) -> float:
        return math.exp(nll_sum / self.scored_tokens) if math.isfinite(nll_sum) else math.inf
