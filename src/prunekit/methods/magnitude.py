"""Magnitude baseline (LLM-Pruner's L2 baseline; method spec ``baselines.md`` section 1).

Unit score = L2 norm of every weight removed with the unit: for a query head its q_proj rows and o_proj columns
(a KV group adds its k_proj and v_proj rows); for an FFN channel its gate_proj and up_proj rows and its down_proj
column. Uniform ratio in every layer, the same for heads and channels, no data. Per-layer unit counts are rounded
exactly as SlimGPT rounds them, so ``magnitude`` and ``slimgpt --option schedule=uniform`` remove the same
structures in number and differ only in which ones and in compensation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunekit.data.windows import TokenWindows
from prunekit.methods.base import Target, register
from prunekit.methods.schedule import uniform_ratios, unit_counts
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.gqa import prune_channels, prune_kv_groups, prune_q_heads
from prunekit.structure.plan import PruningPlan


@register(
    "magnitude",
    needs_calibration=False,
    description="L2 norm of each head / KV group / channel's weights, uniform per layer (data-free baseline)",
    match_parameters=True,
    attention_unit="auto",
)
def magnitude(
    model: nn.Module,
    adapter: ArchAdapter,
    target: Target,
    calibration: TokenWindows | None,
    *,
    seed: int = 0,
    progress: bool = True,
    **settings: Any,
) -> PruningPlan:
    ratio = uniform_ratios(adapter.num_layers, target.layer_linear_ratio(adapter))[0]
    q_head_mode = settings["attention_unit"] == "q_head" or (
        settings["attention_unit"] == "auto" and adapter.num_kv_heads == 1
    )
    counts = unit_counts(ratio, adapter, q_head_mode, settings["match_parameters"])
    head_scores, kv_scores, channel_scores = [], [], []
    for layer in adapter.decoder_layers(model):
        heads, kv, channels = unit_norms(layer, adapter)
        head_scores.append(heads)
        kv_scores.append(kv)
        channel_scores.append(channels)
    plan = PruningPlan.keep_all(adapter)
    layers = adapter.num_layers
    if counts.attention_units and q_head_mode:
        plan = prune_q_heads(plan, head_scores, per_group=counts.attention_units)
    elif counts.attention_units:
        group_scores = [
            _group_norms(heads, kv, adapter.heads_per_group) for heads, kv in zip(head_scores, kv_scores, strict=True)
        ]
        plan = prune_kv_groups(plan, group_scores, per_layer=[counts.attention_units] * layers, scores_are="groups")
    if counts.channels:
        plan = prune_channels(plan, channel_scores, per_layer=[counts.channels] * layers)
    return plan


def unit_norms(layer: nn.Module, adapter: ArchAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums of squares per query head (q rows + o columns), per KV head (k + v rows) and per FFN channel."""
    dh = adapter.head_dim
    attention, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
    q = attention["q_proj"].weight.float().pow(2).sum(dim=1).view(-1, dh).sum(dim=1)
    o = attention["o_proj"].weight.float().pow(2).sum(dim=0).view(-1, dh).sum(dim=1)
    k = attention["k_proj"].weight.float().pow(2).sum(dim=1).view(-1, dh).sum(dim=1)
    v = attention["v_proj"].weight.float().pow(2).sum(dim=1).view(-1, dh).sum(dim=1)
    channels = (mlp["gate_proj"].weight.float().pow(2).sum(dim=1) + mlp["up_proj"].weight.float().pow(2).sum(dim=1)
                + mlp["down_proj"].weight.float().pow(2).sum(dim=0))
    return (q + o).sqrt(), (k + v), channels.sqrt()


def _group_norms(head_squares_root: torch.Tensor, kv_squares: torch.Tensor, g: int) -> list[float]:
    """L2 norm of a whole KV group: its g heads' q/o weights plus its k/v rows."""
    head_squares = head_squares_root.pow(2).view(-1, g).sum(dim=1)
    return (head_squares + kv_squares).sqrt().tolist()
