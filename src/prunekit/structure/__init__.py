"""The pruning plan (what to keep), its validation and GQA rules, parameter accounting, and materialisation."""

from prunekit.structure.blocks import RemovedAttention, RemovedMLP, is_removed
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
from prunekit.structure.materialize import apply_plan
from prunekit.structure.params import (
    ParameterCounts,
    PruningRatios,
    channel_parameters,
    count_parameters,
    counted_parameters,
    dense_parameter_counts,
    kv_group_parameters,
    measured_ratios,
    plan_parameter_counts,
    predicted_ratios,
    query_head_parameters,
)
from prunekit.structure.plan import LayerPlan, PruningPlan

__all__ = [
    "LayerPlan",
    "ParameterCounts",
    "PruningPlan",
    "PruningRatios",
    "RemovedAttention",
    "RemovedMLP",
    "apply_plan",
    "channel_parameters",
    "count_parameters",
    "counted_parameters",
    "dense_parameter_counts",
    "group_heads",
    "group_scores",
    "is_removed",
    "kv_group_of",
    "kv_group_parameters",
    "lowest",
    "measured_ratios",
    "plan_parameter_counts",
    "predicted_ratios",
    "prune_channels",
    "prune_kv_groups",
    "prune_q_heads",
    "query_head_parameters",
    "top_k",
]
