"""The greedy depth search shared by BlockPruner and SLEB: options, the search loop, one step's record.

Each greedy step scores every eligible unit by the calibration loss of the current model with that unit removed
too, and removes the best one. Score = total next-token NLL over the calibration windows: per-window sums from an
fp32 log-softmax (``window_nll_sums``), added window by window in float64. With equal-length windows the perplexity
is exp(sum / scored tokens), so the lowest sum is the lowest perplexity (departure: we compare the sums, so two sums
that differ in their last bits are never merged into a tie by the rounding of exp). Ties keep the earliest unit in
canonical order (layer ascending, attention before MLP): the winner is the minimum of ``(sum, canonical key)``,
exactly what a canonical loop with a strict '<' picks.

The pieces, one module each: units and the stop rule (``units``), the branch stack with its prefix cache, screened
head and carried streams (``stack``, ``screen``), one greedy step (``step``), the resumable state (``state``) and
the schedule artifact (``report``). ``search="fast"`` turns every exact speed-up on, ``"prefix"`` only the prefix
cache, ``"plain"`` none; all three give the same schedule (the tests compare them).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.calibration.store import OFFLOAD_MODES
from prunekit.errors import PrunekitError
from prunekit.methods.base import PruneContext
from prunekit.methods.config import MethodConfig, option
from prunekit.methods.depth.layer_major import layer_major_scores, layer_major_step
from prunekit.methods.depth.report import counts_since, finite, schedule_artifact, step_line
from prunekit.methods.depth.stack import BranchStack
from prunekit.methods.depth.state import SearchState
from prunekit.methods.depth.step import ranked, ranking_of, run_step
from prunekit.methods.depth.units import SELECT_MODES, StopRule, Unit, plan_from_units, removal_ratios
from prunekit.methods.run_state import fingerprint
from prunekit.models.adapters import ArchAdapter
from prunekit.models.onloading import onloader_of
from prunekit.structure.plan import PruningPlan

log = logging.getLogger(__name__)

SEARCH_MODES = ("fast", "prefix", "plain", "layer_major")
ABANDON_BOUNDS = ("runner_up", "best")


@dataclass(frozen=True)
class SearchConfig(MethodConfig):
    """Options every greedy depth method shares (BlockPruner and SLEB add their own)."""

    select: str = option("at_least", "with --ratio: remove the smallest count reaching it (at_least) or the count "
                         "whose ratio is closest (closest, the spec's)", choices=SELECT_MODES)
    extra_steps: int = option(0, "search this many steps past the chosen count, for a longer nested schedule (the "
                              "extra units are not removed)", minimum=0)
    search: str = option("fast", "fast (every exact speed-up), prefix (prefix cache only), plain (each candidate "
                         "from the embeddings) or layer_major (every candidate advanced through each layer while it is "
                         "loaded once; the mode of --offload disk); all give the same schedule", choices=SEARCH_MODES)
    streams: str = option("none", "layer_major: where the candidates' streams live: none (the compute device), cpu or "
                          "disk", choices=OFFLOAD_MODES)
    batch_size: int = option(1, "calibration windows per forward pass", minimum=1)
    max_steps: int = option(0, "pause after this many new steps (needs a state file; rerun to continue); 0 runs to "
                            "the end", minimum=0)
    carry_mb: int = option(2048, "memory cap of carried streams in MiB (0 turns them off)", minimum=0)
    abandon_bound: str = option("best", "early abandon against the best (best) or the runner-up's (runner_up, exact "
                                "margins) complete sum", choices=ABANDON_BOUNDS, internal=True)
    screen_topk: int = option(64, "screened head: top-k tokens per position in its vocabulary subset (0 turns it "
                              "off)", minimum=0, internal=True)


@dataclass(frozen=True)
class SearchOptions:
    """How the search runs (none of these changes the schedule, except ``batch_size`` in the last bits)."""

    # No field defaults: the defaults live once, in SEARCH_DEFAULTS, and every instance comes from from_settings.
    mode: str
    abandon_bound: str
    batch_size: int
    state_path: Path | None
    max_steps: int
    screen_topk: int
    carry_mb: int
    streams: str

    @classmethod
    def from_config(cls, config: SearchConfig, state_path: Path | None) -> SearchOptions:
        if config.max_steps and state_path is None:
            raise PrunekitError("max_steps pauses a search to resume later; it needs a state file (state_path)")
        return cls(config.search, config.abandon_bound, config.batch_size, state_path, config.max_steps,
                   config.screen_topk, config.carry_mb, config.streams)

    @property
    def early_abandon(self) -> str | None:
        return self.abandon_bound if self.mode in ("fast", "layer_major") else None

    @property
    def screen(self) -> int:
        """The screened head's top-k: only with early abandon (it needs a finite bound)."""
        return self.screen_topk if self.mode in ("fast", "layer_major") else 0

    @property
    def carry(self) -> int:
        """The memory cap of carried streams, in MiB: only in the fast search (0 elsewhere)."""
        return self.carry_mb if self.mode == "fast" else 0

    def describe(self) -> dict[str, Any]:
        described = {"search": self.mode, "abandon_bound": self.early_abandon, "batch_size": self.batch_size,
                     "screen_topk": self.screen, "carry_mb": self.carry}
        return {**described, "streams": self.streams} if self.mode == "layer_major" else described


@dataclass(frozen=True)
class DepthSearch:
    """What one greedy depth method searches over.

    ``candidates(removed)``: the eligible units given the units removed so far. ``largest``: the most the method
    can remove (to reject unreachable targets before any compute). ``identity``: the settings that change the
    schedule, for the resume fingerprint. ``what``: the units' name in messages ("sub-blocks", "layers").
    """

    method: str
    candidates: Callable[[Sequence[Unit]], list[Unit]]
    largest: list[Unit]
    identity: dict[str, Any]
    what: str


@dataclass
class SearchOutcome:
    """The units to remove (a prefix of the searched schedule) and the schedule artifact."""

    units: list[Unit]
    schedule: dict[str, Any]

    def plan(self, adapter: ArchAdapter) -> PruningPlan:
        return plan_from_units(adapter, self.units)


def greedy_search(context: PruneContext, search: DepthSearch) -> SearchOutcome:
    """Run (or resume) the greedy search of ``search`` until the context's target is met (module docstring)."""
    config: SearchConfig = context.config
    model, adapter, calibration = context.model, context.adapter, context.windows(search.method)
    rule = StopRule.from_target(context.target, config.select, config.extra_steps)
    options = SearchOptions.from_config(config, context.state_path)
    if onloader_of(model) is not None and options.mode != "layer_major":
        # Layers read from disk: a candidate-major search would read the whole model once per candidate.
        log.info("%s: layers are onloaded, so the search runs layer-major (search=%s ignored)", search.method,
                 options.mode)
        options = dataclasses.replace(options, mode="layer_major")
    rule.check_reachable(adapter, search.largest, search.what)
    identity = {"method": search.method, "batch_size": options.batch_size, **search.identity}
    print_ = fingerprint(model, adapter, calibration, identity) if options.state_path else None
    state = SearchState.open(options.state_path, search.method, print_)
    if not rule.finished(state.ratios()) and search.candidates(state.units()):
        with torch.no_grad():
            _search_steps(model, adapter, calibration, search, rule, options, state, context.progress)
    units, ratios = state.units(), state.ratios()
    chosen = rule.selected(ratios)
    return SearchOutcome(units[:chosen], schedule_artifact(search.method, search.identity, rule, options.describe(),
                                                           state, chosen, calibration))


def _search_steps(model, adapter, calibration, search, rule, options, state, progress) -> None:
    """Build the stack for the state's removal set, score the dense model if new, then step until done."""
    started = time.perf_counter()
    layer_major = options.mode == "layer_major"
    stack = BranchStack(model, adapter, calibration, options.batch_size, options.mode not in ("plain", "layer_major"),
                        progress, options.screen, options.carry)
    units = state.units()
    stack.set_removed(point for unit in units for point in unit.points)
    if state.dense is None:
        nll_sum = (layer_major_scores(stack, [], options.streams, None, progress, "dense")[0] if layer_major
                   else stack.score().nll_sum)
        state.dense = {"nll_sum": nll_sum, "ppl": stack.ppl(nll_sum),
                       "seconds": round(time.perf_counter() - started, 3), **counts_since(stack, {})}
        state.save()
    new_steps = 0
    while not rule.finished(state.ratios()):
        eligible = search.candidates(units)
        if not eligible:
            break
        state.steps.append(_one_step(stack, adapter, search, options, state, units, eligible, progress))
        units.append(Unit.from_label(state.steps[-1]["unit"]))
        state.save()
        log.info(step_line(search.method, len(state.steps), state.steps[-1]))
        new_steps += 1
        if options.max_steps and new_steps >= options.max_steps and not rule.finished(state.ratios()):
            raise PrunekitError(f"{search.method} search paused after {new_steps} new steps ({len(state.steps)} done); "
                                f"state saved in {options.state_path}; rerun the same command to continue")


def _one_step(stack, adapter, search, options, state, units, eligible, progress) -> dict[str, Any]:
    """Score the eligible units, remove the winner from the stack, and return the step's record."""
    started, before = time.perf_counter(), dict(stack.counts)
    order = ranked(eligible, state.ranking() if options.early_abandon else None)
    step = len(state.steps) + 1
    desc = f"{search.method} step {step}"
    outcome = (layer_major_step(stack, order, options.streams, options.early_abandon, progress, desc)
               if options.mode == "layer_major" else run_step(stack, order, options.early_abandon, progress, desc))
    stack.set_removed(stack.removed | set(outcome.best.points))
    ratio_all, ratio_layers = removal_ratios(adapter, [*units, outcome.best])
    runner_ppl = stack.ppl(outcome.runner_up_sum) if outcome.runner_up_sum is not None else None
    best_ppl = stack.ppl(outcome.best_sum)
    scores = outcome.scores
    return {
        "unit": outcome.best.label(), "nll_sum": outcome.best_sum, "ppl": best_ppl,
        "runner_up": outcome.runner_up.label() if outcome.runner_up else None,
        "runner_up_ppl": finite(runner_ppl),
        "margin": finite(runner_ppl - best_ppl if runner_ppl is not None else None),
        "margin_exact": outcome.margin_exact, "ratio_all": ratio_all, "ratio_layers": ratio_layers,
        "seconds": round(time.perf_counter() - started, 3), **counts_since(stack, before),
        "candidates": len(scores), "abandoned": sum(not s.complete for s in scores.values()),
        "scores": [[*u.label(), finite(stack.ppl(scores[u].nll_sum)) if scores[u].complete else None,
                    scores[u].windows] for u in sorted(scores, key=lambda u: u.key)],
        "ranking": [u.label() for u in ranking_of(scores, stack.num_windows) if u != outcome.best],
    }
