"""Magnitude baseline (LLM-Pruner's L2 baseline; method spec ``baselines.md`` section 1).

Unit score = L2 norm of every weight removed with the unit: for a query head its q_proj rows and o_proj columns
(a KV group adds its k_proj and v_proj rows); for an FFN channel its gate_proj and up_proj rows and its down_proj
column. No data. The spec's allocation is the default: a uniform ratio in every layer, the same for heads and
channels, with per-layer unit counts rounded exactly as SlimGPT rounds them, so ``magnitude`` and ``slimgpt
--option schedule=uniform`` remove the same structures in number and differ only in which ones and in
compensation. The shared allocator's other modes are options (``allocation=layer_range`` or ``global``); in
``global`` the norms are standardised per layer and unit type before heads and channels compete.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.methods.base import WIDTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.width import WidthConfig
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.allocation import UnitScores, allocate, resolve_attention_unit
from prunekit.structure.plan import PruningPlan


@dataclass(frozen=True)
class MagnitudeConfig(WidthConfig):
    """The shared allocation options (``methods.width``), with the spec's uniform default."""


@register("magnitude", config=MagnitudeConfig, capabilities=Capabilities(WIDTH, needs_calibration=False),
          description="L2 norm of each head / KV group / channel's weights, uniform per layer (data-free baseline)")
def magnitude(context: PruneContext) -> MethodResult:
    config: MagnitudeConfig = context.config
    adapter = context.adapter
    attention_unit = resolve_attention_unit(adapter, config.attention_unit)
    attention, channels = [], []
    for layer in adapter.decoder_layers(context.model):
        heads, kv, channel_norms = unit_norms(layer, adapter)
        attention.append(heads if attention_unit == "q_head" else _group_norms(heads, kv, adapter.heads_per_group))
        channels.append(channel_norms)
    target = context.target
    plan = allocate(PruningPlan.keep_all(adapter), adapter, UnitScores(attention, channels),
                    target.layer_linear_ratio(adapter), config.allocation, attention_unit,
                    match_parameters=config.match_parameters, budget=(target.ratio, target.of))
    return MethodResult(plan)


def unit_norms(layer: nn.Module, adapter: ArchAdapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2 norm per query head (q rows + o columns), sum of squares per KV head (k + v rows), L2 norm per channel."""
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
