"""The greedy depth search (BlockPruner, SLEB) and the removal units shared with ShortGPT; see ``search``."""

from prunekit.methods.depth.search import DepthSearch, SearchConfig, SearchOptions, SearchOutcome, greedy_search
from prunekit.methods.depth.units import ATTN, LAYER, MLP, StopRule, Unit, plan_from_units, removal_ratios

__all__ = [
    "ATTN",
    "LAYER",
    "MLP",
    "DepthSearch",
    "SearchConfig",
    "SearchOptions",
    "SearchOutcome",
    "StopRule",
    "Unit",
    "greedy_search",
    "plan_from_units",
    "removal_ratios",
]
