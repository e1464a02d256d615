"""SLEB (Song et al., arXiv 2402.09025; method spec ``baselines.md`` section 5): greedy removal of whole decoder
layers by calibration loss.

Each round scores every alive layer except the first and the last alive one (``keep_first`` / ``keep_last``,
default 1 / 1) by the total NLL of the calibration tokens with that layer removed too, and removes the argmin; all
layers are re-scored every round. It is BlockPruner's search at layer granularity, so it runs on the same engine
(:mod:`prunekit.methods.depth`) with the same exact prefix cache and early abandon (the spec: "the
BlockPruner speed-ups apply unchanged"); the schedule is the ``sleb_schedule.json`` artifact.

Departures from the reference code, each an option: calibration counted in tokens (default 4 x 2048 of the
project calibration corpus, not 128 shuffled WikiText-2 records); the model runs in its loaded dtype with an fp32
log-softmax; the count comes from ``--blocks`` or from the ratio target (smallest count reaching it, ``select``),
not from a share of the layers; ties keep the earliest layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.methods.base import DEPTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import option
from prunekit.methods.depth import LAYER, DepthSearch, SearchConfig, Unit, greedy_search
from prunekit.models.adapters import ArchAdapter

SCHEDULE_FILE = "sleb_schedule.json"


@dataclass(frozen=True)
class SLEBConfig(SearchConfig):
    keep_first: int = option(1, "never remove this many first alive layers (the spec's barrier)", minimum=0)
    keep_last: int = option(1, "never remove this many last alive layers (the spec's barrier)", minimum=0)


@register("sleb", config=SLEBConfig, capabilities=Capabilities(DEPTH, resumable=True, nested=True, onloading=True,
                                       distributed=True),
          description="greedy removal of whole layers by calibration loss, re-scored every round (Song et al. 2024)",
          calibration_tokens=4 * 2048, calibration_seqlen=2048)
def sleb(context: PruneContext) -> MethodResult:
    """Search the layer-removal schedule; ``--blocks K`` removes exactly K layers."""
    config: SLEBConfig = context.config
    outcome = greedy_search(context, sleb_search(context.adapter, config.keep_first, config.keep_last))
    return MethodResult(outcome.plan(context.adapter), {SCHEDULE_FILE: outcome.schedule})


def sleb_search(adapter: ArchAdapter, keep_first: int = 1, keep_last: int = 1) -> DepthSearch:
    """Candidates: the alive layers without the first ``keep_first`` and last ``keep_last`` alive ones."""
    if keep_first < 0 or keep_last < 0:
        raise PrunekitError(f"keep_first and keep_last must not be negative (got {keep_first}, {keep_last})")

    def candidates(removed: Any) -> list[Unit]:
        gone = {unit.layer for unit in removed}
        alive = [layer for layer in range(adapter.num_layers) if layer not in gone]
        return [Unit(LAYER, layer) for layer in alive[keep_first : max(keep_first, len(alive) - keep_last)]]

    # The barriers are the original first / last layers (never removable), so the eligible set at the start is
    # also the most that can ever be removed.
    identity = {"keep_first": keep_first, "keep_last": keep_last}
    return DepthSearch("sleb", candidates, candidates([]), identity, "layers")
