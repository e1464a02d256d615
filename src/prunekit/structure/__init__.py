"""The pruning plan (what to keep), its validation and GQA rules, unit costs and the width allocator, parameter
accounting, masked forwards, and materialisation."""

from prunekit.structure.allocation import (
    ALLOCATIONS,
    ATTENTION_UNITS,
    LayerCounts,
    UnitScores,
    allocate,
    layer_counts,
    resolve_attention_unit,
)
from prunekit.structure.blocks import RemovedAttention, RemovedMLP, is_removed
from prunekit.structure.costs import UnitCosts
from prunekit.structure.gqa import (
    group_heads,
    group_scores,
    kv_group_of,
    lowest,
    prune_channels,
    prune_kv_groups,
    prune_q_heads,
    top_k,
)
from prunekit.structure.masks import MaskedForward, UnitMask
from prunekit.structure.materialize import apply_plan
from prunekit.structure.params import (
    ParameterCounts,
    PruningRatios,
    count_parameters,
    counted_parameters,
    dense_parameter_counts,
    measured_ratios,
    plan_parameter_counts,
    predicted_ratios,
)
from prunekit.structure.plan import LayerPlan, PruningPlan
from prunekit.structure.schedules import SCHEDULES, layer_ratios

__all__ = [
    "ALLOCATIONS",
    "ATTENTION_UNITS",
    "SCHEDULES",
    "LayerCounts",
    "MaskedForward",
    "UnitCosts",
    "UnitMask",
    "UnitScores",
    "allocate",
    "layer_counts",
    "layer_ratios",
    "resolve_attention_unit",
    "LayerPlan",
    "ParameterCounts",
    "PruningPlan",
    "PruningRatios",
    "RemovedAttention",
    "RemovedMLP",
    "apply_plan",
    "count_parameters",
    "counted_parameters",
    "dense_parameter_counts",
    "group_heads",
    "group_scores",
    "is_removed",
    "kv_group_of",
    "lowest",
    "measured_ratios",
    "plan_parameter_counts",
    "predicted_ratios",
    "prune_channels",
    "prune_kv_groups",
    "prune_q_heads",
    "top_k",
]
