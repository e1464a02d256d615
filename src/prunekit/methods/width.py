"""What the score-and-allocate width methods share: options, calibration passes, and allocation of their scores.

Magnitude, Wanda-sp, FLAP, LLM-BIP and LLM-Pruner's Taylor score query heads and FFN channels, then hand the scores
to the shared allocator (``structure.allocation``). This module owns the parts they have in common:

- :class:`WidthConfig`: the allocation options every one of them offers (allocation mode, parameter matching,
  attention unit); a method subclasses it to change a default or add its own options.
- :func:`dense_scores`: one layer-by-layer pass of the dense model over the calibration windows, the inputs of the
  chosen linears hooked while each layer computes the next layer's inputs (FLAP, LLM-BIP: one forward in all).
- :func:`sequential_plan`: Wanda-sp's layer-sequential procedure (and LLM-BIP's ``sequential`` option): score layer
  l on the outputs of the already pruned layers < l, prune it, recompute its outputs pruned, continue. The pruned
  layers run under a :class:`~prunekit.structure.masks.MaskedForward` mask, so no weight is touched.
- :func:`allocate_scores`: per-query-head scores folded into the attention unit (KV group or query head) and
  passed with the channel scores to :func:`~prunekit.structure.allocation.allocate`.

A scorer maps ``(index, layer, statistics)`` to ``(head_scores [n_q], channel_scores [d_ff])``; higher = keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.calibration.runner import LayerwiseRunner
from prunekit.calibration.statistics import InputStatistics
from prunekit.methods.base import PruneContext
from prunekit.methods.config import MethodConfig, option
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.allocation import (
    ALLOCATIONS,
    ATTENTION_UNITS,
    PER_LAYER,
    LayerCounts,
    UnitScores,
    allocate,
    per_layer_counts,
    resolve_attention_unit,
    select_per_layer,
)
from prunekit.structure.masks import MaskedForward, UnitMask
from prunekit.structure.plan import PruningPlan

Scores = tuple[torch.Tensor, torch.Tensor]  # per query head [n_q], per FFN channel [d_ff]
Scorer = Callable[[int, nn.Module, dict[str, InputStatistics]], Scores]
LayerHooks = Callable[[int, nn.Module], AbstractContextManager]


def allocation_option(default: str, help_text: str):
    """The ``allocation`` option with a method's own default and help (the choices are the allocator's)."""
    return option(default, help_text, choices=ALLOCATIONS)


@dataclass(frozen=True)
class WidthConfig(MethodConfig):
    allocation: str = allocation_option("uniform", "how units are allocated across layers: uniform, log_increase, "
                                        "layer_range (LLM-Pruner's range) or global (all layers and both unit types "
                                        "ranked together)")
    match_parameters: bool = option(True, "per-layer modes: after rounding a layer's heads, set its channel count "
                                    "so the layer's removed weights match its ratio")
    attention_unit: str = option("auto", "kv_group (whole KV groups), q_head (query heads, k/v kept) or auto "
                                 "(q_head for one-KV-head models)", choices=ATTENTION_UNITS)


def output_linears(adapter: ArchAdapter, layer: nn.Module) -> dict[str, nn.Linear]:
    """The two linears whose input columns are a layer's width units: o_proj (heads) and down_proj (channels)."""
    return {"o_proj": adapter.attention_linears(layer)["o_proj"], "down_proj": adapter.mlp_linears(layer)["down_proj"]}


def attention_units(head_scores: torch.Tensor, adapter: ArchAdapter, attention_unit: str,
                    reduce: str = "sum") -> torch.Tensor:
    """Per-query-head scores as scores of the attention unit: unchanged in q-head mode, else per KV group (the
    sum, or the mean, of its g heads)."""
    if attention_unit == "q_head":
        return head_scores
    groups = head_scores.reshape(adapter.num_kv_heads, adapter.heads_per_group)
    return groups.sum(dim=1) if reduce == "sum" else groups.mean(dim=1)


def allocate_scores(context: PruneContext, config: WidthConfig, heads: list[torch.Tensor],
                    channels: list[torch.Tensor], *, reduce: str = "sum", standardize: bool = True) -> PruningPlan:
    """The plan removing the lowest-scored units as ``config.allocation`` allocates them."""
    adapter, target = context.adapter, context.target
    unit = resolve_attention_unit(adapter, config.attention_unit)
    rows = [attention_units(row, adapter, unit, reduce) for row in heads]
    return allocate(PruningPlan.keep_all(adapter), adapter, UnitScores(rows, channels),
                    target.layer_linear_ratio(adapter), config.allocation, unit,
                    match_parameters=config.match_parameters, budget=(target.ratio, target.of),
                    standardize=standardize)


def check_allocation(context: PruneContext) -> None:
    """Fail before any pass on a target the allocation cannot meet (a per-layer ratio that would empty a layer's
    range, an attention unit the model cannot use); the global mode is checked when it ranks."""
    adapter, config = context.adapter, context.config
    unit = resolve_attention_unit(adapter, config.attention_unit)
    ratio = context.target.layer_linear_ratio(adapter)
    if config.allocation in PER_LAYER:
        per_layer_counts(adapter, ratio, config.allocation, unit, config.match_parameters)


def _runner(context: PruneContext, method: str, batch_size: int, split_windows: bool) -> LayerwiseRunner:
    """``split_windows``: under torchrun each process takes a share of the windows (only when every statistic the
    scorer uses comes from the runner, which combines them across processes)."""
    return LayerwiseRunner(context.model, context.adapter, context.windows(method), batch_size=batch_size,
                           progress=context.progress, split_windows=split_windows)


def dense_scores(context: PruneContext, method: str, kinds: Iterable[str], scorer: Scorer, *, batch_size: int = 8,
                 layer_hooks: LayerHooks | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's scores from one pass of the dense model (see the module docstring)."""
    heads, channels = [], []
    check_allocation(context)
    with _runner(context, method, batch_size, layer_hooks is None) as runner:
        for index, layer in runner.layers():
            with layer_hooks(index, layer) if layer_hooks else nullcontext():
                statistics = runner.advance(index, output_linears(context.adapter, layer), kinds)
            head_row, channel_row = scorer(index, layer, statistics)
            heads.append(head_row)
            channels.append(channel_row)
    return heads, channels


def sequential_plan(context: PruneContext, method: str, config: WidthConfig, kinds: Iterable[str], scorer: Scorer,
                    *, batch_size: int = 8, layer_hooks: LayerHooks | None = None) -> PruningPlan:
    """Layer-sequential scoring and pruning (see the module docstring); per-layer allocations only."""
    adapter = context.adapter
    unit = resolve_attention_unit(adapter, config.attention_unit)
    counts = per_layer_counts(adapter, context.target.layer_linear_ratio(adapter), config.allocation, unit,
                              config.match_parameters)
    plan = PruningPlan.keep_all(adapter)
    with _runner(context, method, batch_size, layer_hooks is None) as runner, \
            MaskedForward(context.model, adapter) as masked:
        for index, layer in runner.layers():
            with layer_hooks(index, layer) if layer_hooks else nullcontext():
                statistics = runner.collect_keeping_attention(index, output_linears(adapter, layer), kinds)
            head_row, channel_row = scorer(index, layer, statistics)
            plan = _prune_one_layer(plan, adapter, index, attention_units(head_row, adapter, unit), channel_row,
                                    counts, unit)
            masked.set_mask(UnitMask.from_plan(plan))  # layers <= index pruned, the rest still dense
            # The heads' outputs do not depend on which heads are kept: the pruned attention output is the kept
            # o_proj inputs through the masked o_proj (one matmul); only the MLP runs again.
            runner.finish_branch(index, "attention")
            runner.run_branch(index, "mlp")
    return plan


def _prune_one_layer(plan, adapter, index, attention_row, channel_row, counts, unit) -> PruningPlan:
    """Apply layer ``index``'s counts to its scores; other layers get placeholder rows and zero counts."""
    attention = [attention_row if layer == index else torch.zeros_like(attention_row)
                 for layer in range(adapter.num_layers)]
    channels = [channel_row if layer == index else torch.zeros_like(channel_row) for layer in range(adapter.num_layers)]
    only = [count if layer == index else LayerCounts(0, 0) for layer, count in enumerate(counts)]
    return select_per_layer(plan, UnitScores(attention, channels), only, unit)


def columns_per_head(values: torch.Tensor, head_dim: int, reduce: str = "sum") -> torch.Tensor:
    """Per-column values of o_proj's input ``[n_q * d_h]`` folded into one value per query head."""
    per_head = values.reshape(-1, head_dim)
    return per_head.sum(dim=1) if reduce == "sum" else per_head.mean(dim=1)


def removed_columns(plan: PruningPlan, adapter: ArchAdapter, index: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The removed input columns of layer ``index``'s o_proj and down_proj, by linear name."""
    layer = plan.layers[index]
    dh = adapter.head_dim
    gone_heads = sorted(set(range(adapter.num_heads)) - set(layer.kept_heads))
    gone_channels = sorted(set(range(adapter.intermediate_size)) - set(layer.kept_channels))
    head_columns = [head * dh + offset for head in gone_heads for offset in range(dh)]
    yield "o_proj", torch.tensor(head_columns, dtype=torch.long)
    yield "down_proj", torch.tensor(gone_channels, dtype=torch.long)
