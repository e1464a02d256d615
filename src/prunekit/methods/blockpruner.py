"""BlockPruner (Zhong et al., arXiv 2406.10594; method spec ``blockpruner.md``): greedy removal of attention and
MLP sub-blocks by calibration perplexity.

Every layer offers two units, its attention branch and its MLP branch (each with the norms on it). Each step
scores the calibration perplexity of the current model with every remaining unit removed in addition and removes
the best one (strict '<' in canonical order, so ties keep the earliest unit); no look-ahead, no add-back. The
search and its exact speed-ups (prefix cache, early abandon, ranked order) live in
:mod:`prunekit.methods.depth`; the schedule (order, perplexity after every step, ratios, margins, timings,
branch-run counts) is returned as the ``blockpruner_schedule.json`` artifact of the checkpoint.

Departures from the paper, each an option with the toolkit default from the spec:
- calibration is counted in tokens (default 4 windows x 2048 = 8,192 tokens of the project calibration corpus,
  one window per forward); the paper draws 256 Alpaca records.
- fp32 model and fp32 log-softmax (the released code runs bf16 and casts logits late).
- the candidates are compared by total NLL, not by rounded perplexity (see ``methods.depth.search``).
- ``--blocks K`` removes exactly K units; with a ratio target the smallest K reaching it is removed (``select=
  at_least``; the spec's ``closest`` is an option) and the search stops there (``extra_steps=0``; the spec's
  K_max adds 2 steps).
- ``protect_first_last`` (off, as in the paper) excludes the first and the last layer's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.methods.base import DEPTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import option
from prunekit.methods.depth import ATTN, MLP, DepthSearch, SearchConfig, Unit, greedy_search
from prunekit.models.adapters import ArchAdapter

BLOCK_TYPES = {"mix": (ATTN, MLP), "attn": (ATTN,), "mlp": (MLP,)}
SCHEDULE_FILE = "blockpruner_schedule.json"


@dataclass(frozen=True)
class BlockPrunerConfig(SearchConfig):
    block_type: str = option("mix", "candidate sub-blocks: attention and MLP (mix), attention only or MLP only",
                             choices=tuple(BLOCK_TYPES))
    protect_first_last: bool = option(False, "never remove the first and the last layer's sub-blocks")


@register("blockpruner", config=BlockPrunerConfig,
          capabilities=Capabilities(DEPTH, resumable=True, nested=True, onloading=True,
                                       distributed=True),
          description="greedy removal of attention / MLP sub-blocks by calibration perplexity (Zhong et al. 2024)",
          calibration_tokens=4 * 2048, calibration_seqlen=2048)
def blockpruner(context: PruneContext) -> MethodResult:
    """Search the removal schedule; return the plan for the chosen prefix and the schedule artifact.

    ``--blocks K`` removes exactly K sub-blocks; a ratio target removes the count ``select`` chooses. A state file
    (``context.state_path``) makes the search resumable (``methods.depth.state``).
    """
    config: BlockPrunerConfig = context.config
    search = blockpruner_search(context.adapter, config.block_type, config.protect_first_last)
    outcome = greedy_search(context, search)
    return MethodResult(outcome.plan(context.adapter), {SCHEDULE_FILE: outcome.schedule})


def blockpruner_search(adapter: ArchAdapter, block_type: str = "mix", protect_first_last: bool = False) -> DepthSearch:
    """The candidate set: every sub-block of the chosen types, minus those already removed."""
    if block_type not in BLOCK_TYPES:
        raise PrunekitError(f"unknown block_type '{block_type}'; use one of: {', '.join(BLOCK_TYPES)}")
    layers = range(adapter.num_layers)
    if protect_first_last:
        layers = range(1, adapter.num_layers - 1)
    every = [Unit(kind, layer) for layer in layers for kind in BLOCK_TYPES[block_type]]

    def candidates(removed: Any) -> list[Unit]:
        gone = set(removed)
        return [unit for unit in every if unit not in gone]

    identity = {"block_type": block_type, "protect_first_last": protect_first_last}
    # At most all but one: a model needs at least one block (with block_type attn or mlp the others stay anyway).
    largest = every[:-1] if block_type == "mix" and not protect_first_last else every
    return DepthSearch("blockpruner", candidates, largest, identity, "sub-blocks")
