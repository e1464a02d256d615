"""The width allocator: how many heads and channels each layer loses, and which ones, from a method's scores.

Methods score units; this module decides, by named mode, what goes:

- ``uniform``: the same ratio in every layer (``schedules.uniform_ratios``);
- ``log_increase``: SlimGPT's log-increasing per-layer ratios; ``layer_range``: LLM-Pruner's range with untouched
  first and last layers (``schedules``);
- ``global``: units of every layer and both types ranked together (lowest score first), each removal counted at its
  parameter cost, until the removed parameters are closest to the target; per-layer floors keep at least
  ``min_groups`` KV groups (q-head mode: query heads per group) and ``min_channels`` channels in each layer. With
  ``standardize`` the scores are z-scored per layer and unit type first (FLAP's AL-AM, LLM-BIP's V2), so that
  heads and channels, and shallow and deep layers, compete on one scale.

In the per-layer modes a layer's ratio becomes whole units by :func:`layer_counts`: attention units rounded to the
nearest count (at least one kept), then, with ``match_parameters`` (SlimGPT spec open point 2), the channel count
set so the layer's removed weights match the ratio as closely as whole channels allow (with only 3 KV groups per
layer, as in SmolLM2, rounding the heads alone is far off).

The attention unit is resolved and validated here, once: ``kv_group`` removes whole KV groups (a KV head with its g
query heads); ``q_head`` removes the same number of query heads from every group of a layer and keeps k/v (the only
width option for one-KV-head models such as Gemma-3-270M); ``auto`` picks ``q_head`` exactly when the model has one
KV head. Unit parameter costs come from ``structure.costs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.costs import CHANNEL, KV_GROUP, KV_HEAD, QUERY_HEAD, UnitCosts
from prunekit.structure.gqa import prune_channels, prune_kv_groups, prune_q_heads, score_row
from prunekit.structure.params import dense_parameter_counts
from prunekit.structure.plan import PruningPlan
from prunekit.structure.schedules import layer_ratios

ATTENTION_UNITS = ("auto", "kv_group", "q_head")
ALLOCATIONS = ("uniform", "log_increase", "layer_range", "global")
PER_LAYER = ("uniform", "log_increase", "layer_range")


def resolve_attention_unit(adapter: ArchAdapter, requested: str) -> str:
    """``kv_group`` or ``q_head`` for this model; a one-line error for a name or a mode the model cannot use."""
    if requested not in ATTENTION_UNITS:
        raise PrunekitError(f"unknown attention_unit '{requested}'; use one of: {', '.join(ATTENTION_UNITS)}")
    if requested == "auto":
        return "q_head" if adapter.num_kv_heads == 1 else "kv_group"
    if requested == "kv_group" and adapter.num_kv_heads == 1:
        raise PrunekitError("attention_unit=kv_group on a model with one KV head would remove whole attention blocks; "
                            "use q_head (or auto)")
    if requested == "q_head" and adapter.heads_per_group == 1:
        raise PrunekitError("attention_unit=q_head removes query heads inside KV groups, but this model has one query "
                            "head per KV head; use kv_group (or auto)")
    return requested


@dataclass(frozen=True)
class LayerCounts:
    """How many attention units and FFN channels one layer loses."""

    attention_units: int  # KV groups, or query heads per group in q-head mode
    channels: int


def layer_counts(ratio: float, adapter: ArchAdapter, attention_unit: str = "kv_group",
                 match_parameters: bool = True) -> LayerCounts:
    """Round one layer's ratio (share of its linear weights) to whole units; see the module docstring."""
    costs = UnitCosts.of(adapter)
    q_head_mode = attention_unit == "q_head"
    if q_head_mode:  # one unit = one query head from every group
        available, unit_weights = adapter.heads_per_group - 1, adapter.num_kv_heads * costs.weights(QUERY_HEAD)
    else:
        available, unit_weights = adapter.num_kv_heads - 1, costs.weights(KV_GROUP)
    total_units = adapter.heads_per_group if q_head_mode else adapter.num_kv_heads
    units = min(available, round(ratio * total_units))
    channel_weights = costs.weights(CHANNEL)
    if not match_parameters:
        return LayerCounts(units, min(adapter.intermediate_size - 1, round(ratio * adapter.intermediate_size)))
    attention_weights = adapter.num_heads * costs.weights(QUERY_HEAD) + adapter.num_kv_heads * costs.weights(KV_HEAD)
    layer_weights = attention_weights + adapter.intermediate_size * channel_weights
    channels = round((ratio * layer_weights - units * unit_weights) / channel_weights)
    return LayerCounts(units, max(0, min(adapter.intermediate_size - 1, channels)))


@dataclass(frozen=True)
class UnitScores:
    """A method's scores, one row per dense layer (None for a layer whose block is gone); higher = more important.

    ``attention``: KV-group scores ``[n_kv]`` in kv_group mode, query-head scores ``[n_q]`` in q_head mode.
    ``channels``: FFN-channel scores ``[d_ff]``.
    """

    attention: Sequence[torch.Tensor | Sequence[float] | None]
    channels: Sequence[torch.Tensor | Sequence[float] | None]


def allocate(plan: PruningPlan, adapter: ArchAdapter, scores: UnitScores, ratio_of_layers: float,
             mode: str = "uniform", attention_unit: str = "kv_group", *, match_parameters: bool = True,
             schedule: dict | None = None, budget: tuple[float, str] | None = None, standardize: bool = True,
             min_groups: int = 1, min_channels: int = 1) -> PruningPlan:
    """The plan after removing the lowest-scored units as ``mode`` allocates them (a new plan is returned).

    ``ratio_of_layers``: the target as a share of layer weights (per-layer modes). ``schedule``: keyword options
    of :func:`~prunekit.structure.schedules.layer_ratios`. ``budget`` (global mode): ``(ratio, of)``, the target
    as the method was given it, so the removed parameters are counted in the same measure.
    """
    if mode in PER_LAYER:
        counts = per_layer_counts(adapter, ratio_of_layers, mode, attention_unit, match_parameters, schedule)
        return select_per_layer(plan, scores, counts, attention_unit)
    if mode == "global":
        ratio, of = budget if budget is not None else (ratio_of_layers, "linear")
        return select_global(plan, adapter, scores, ratio, of, attention_unit, standardize=standardize,
                             min_groups=min_groups, min_channels=min_channels)
    raise PrunekitError(f"unknown allocation '{mode}'; use one of: {', '.join(ALLOCATIONS)}")


def per_layer_counts(adapter: ArchAdapter, ratio_of_layers: float, mode: str, attention_unit: str = "kv_group",
                     match_parameters: bool = True, schedule: dict | None = None) -> list[LayerCounts]:
    """Every layer's unit counts under a per-layer ``mode`` (layer-sequential methods need them up front)."""
    if mode not in PER_LAYER:
        raise PrunekitError(f"allocation '{mode}' is not per layer; use one of: {', '.join(PER_LAYER)}")
    ratios = layer_ratios(adapter.num_layers, ratio_of_layers, mode, **(schedule or {}))
    return [layer_counts(ratio, adapter, attention_unit, match_parameters) for ratio in ratios]


def select_per_layer(plan: PruningPlan, scores: UnitScores, counts: Sequence[LayerCounts],
                     attention_unit: str) -> PruningPlan:
    """Remove, in every layer, its count of lowest-scored attention units and channels."""
    attention = [count.attention_units for count in counts]
    channels = [count.channels for count in counts]
    if any(attention) and attention_unit == "q_head":
        plan = prune_q_heads(plan, scores.attention, per_group=attention)
    elif any(attention):
        plan = prune_kv_groups(plan, scores.attention, per_layer=attention, scores_are="groups")
    if any(channels):
        plan = prune_channels(plan, scores.channels, per_layer=channels)
    return plan


# -- global ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Candidate:
    score: float
    cost: int
    layer: int
    kind: str  # "attention" or "channel"
    index: int  # group, q-head slot (1 = each group's lowest head), or channel

    @property
    def order(self) -> tuple:
        return (self.score, self.layer, self.kind, self.index)


def select_global(plan: PruningPlan, adapter: ArchAdapter, scores: UnitScores, ratio: float, of: str,
                  attention_unit: str, *, standardize: bool = True, min_groups: int = 1,
                  min_channels: int = 1) -> PruningPlan:
    """Remove units in order of score across every layer and both types until the removed parameters (in the
    measure ``of``) are closest to ``ratio`` of the dense model's; see the module docstring."""
    if min_groups < 1 or min_channels < 0:
        raise PrunekitError(f"per-layer floors must keep at least one attention unit and no negative number of "
                            f"channels (got {min_groups}, {min_channels}); remove whole blocks with a depth method")
    dense = dense_parameter_counts(adapter)
    goal = ratio * (dense.layer_linear if of == "linear" else dense.total)
    candidates = _attention_candidates(plan, adapter, scores, attention_unit, of, standardize)
    candidates += _channel_candidates(plan, adapter, scores, of, standardize)
    left_attention = {index: _attention_left(layer, attention_unit)
                      for index, layer in enumerate(plan.layers) if layer.has_attention}
    left_channels = {index: len(layer.kept_channels) for index, layer in enumerate(plan.layers) if layer.has_mlp}
    removed_cost, chosen = 0.0, []
    for unit in sorted(candidates, key=lambda candidate: candidate.order):
        left, floor = ((left_attention, min_groups) if unit.kind == "attention" else (left_channels, min_channels))
        if left[unit.layer] <= floor:
            continue
        if removed_cost + unit.cost / 2 >= goal:  # removing it would land further from the goal than stopping
            break
        left[unit.layer] -= 1
        removed_cost += unit.cost
        chosen.append(unit)
    return _apply_global(plan, scores, chosen, attention_unit)


def _attention_left(layer, attention_unit: str) -> int:
    """Attention units a layer still has: KV groups, or query heads per group in q-head mode."""
    if attention_unit == "q_head":
        return len(layer.kept_heads) // len(layer.kept_kv_heads)
    return len(layer.kept_kv_heads)


def _standardized(row: Sequence[float], standardize: bool) -> list[float]:
    if not standardize or len(row) < 2:
        return list(row)
    mean = math.fsum(row) / len(row)
    std = math.sqrt(math.fsum((value - mean) ** 2 for value in row) / (len(row) - 1))
    return [(value - mean) / std if std > 0 else 0.0 for value in row]


def _attention_candidates(plan, adapter, scores, attention_unit, of, standardize) -> list[_Candidate]:
    costs, g = UnitCosts.of(adapter), adapter.heads_per_group
    candidates = []
    for index, layer in enumerate(plan.layers):
        if not layer.has_attention:
            continue
        width = adapter.num_heads if attention_unit == "q_head" else adapter.num_kv_heads
        row = score_row(scores.attention, index, width)
        if attention_unit == "kv_group":
            values = _standardized([row[group] for group in layer.kept_kv_heads], standardize)
            candidates += [_Candidate(value, costs.cost(KV_GROUP, of), index, "attention", group)
                           for value, group in zip(values, layer.kept_kv_heads, strict=True)]
            continue
        standardized = dict(zip(layer.kept_heads, _standardized([row[h] for h in layer.kept_heads], standardize),
                                strict=True))
        per_group = [sorted(standardized[h] for h in layer.kept_heads if h // g == group)
                     for group in layer.kept_kv_heads]
        cost = len(layer.kept_kv_heads) * costs.cost(QUERY_HEAD, of)
        candidates += [_Candidate(math.fsum(heads[slot] for heads in per_group), cost, index, "attention", slot + 1)
                       for slot in range(len(per_group[0]))]
    return candidates


def _channel_candidates(plan, adapter, scores, of, standardize) -> list[_Candidate]:
    cost = UnitCosts.of(adapter).cost(CHANNEL, of)
    candidates = []
    for index, layer in enumerate(plan.layers):
        if layer.has_mlp:
            row = score_row(scores.channels, index, adapter.intermediate_size)
            values = _standardized([row[channel] for channel in layer.kept_channels], standardize)
            candidates += [_Candidate(value, cost, index, "channel", channel)
                           for value, channel in zip(values, layer.kept_channels, strict=True)]
    return candidates


def _apply_global(plan, scores, chosen: list[_Candidate], attention_unit: str) -> PruningPlan:
    attention = [0] * len(plan.layers)
    channels: dict[int, set[int]] = {}
    groups: dict[int, set[int]] = {}
    for unit in chosen:
        if unit.kind == "channel":
            channels.setdefault(unit.layer, set()).add(unit.index)
        elif attention_unit == "q_head":
            attention[unit.layer] += 1  # slots go in order, so the count says which heads
        else:
            groups.setdefault(unit.layer, set()).add(unit.index)
    plan = plan.copy()
    if any(attention):
        plan = prune_q_heads(plan, scores.attention, per_group=attention)
    for index, removed in groups.items():
        plan.keep_kv_groups(index, [group for group in plan.layers[index].kept_kv_heads if group not in removed])
    for index, removed in channels.items():
        plan.keep_channels(index, [channel for channel in plan.layers[index].kept_channels if channel not in removed])
    return plan

