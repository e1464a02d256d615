"""Turn importance scores into valid width decisions: KV groups, query heads (q-head mode), FFN channels.

Methods compute scores; these helpers own the coupling rules so no method re-implements them:

- ``prune_kv_groups``: remove whole KV groups (KV head j with query heads j*g .. j*g+g-1). A group's score is the
  sum of its g query-head scores unless the caller passes group scores. At least ``min_groups`` groups stay per
  layer (default 1); with ``min_groups=0`` a layer that loses every group loses its attention block.
- ``prune_q_heads`` ("q-head mode"): remove the same number of query heads from every kept group of a layer (its
  lowest-scored ones), keeping k/v. It is the only width option for MQA (n_kv = 1, e.g. Gemma-3-270M).
- ``prune_channels``: remove the lowest-scored FFN channels (``top_k`` is the per-vector primitive).

Counts are given either per layer or as one model-wide total (the lowest-scored units across all layers, which is
only meaningful when the method made scores comparable across layers). Every ranking sorts by (score, layer
index, unit index) ascending and removes from the front, so ties fall on the lower layer, then the lower unit.
Scores are indexed by DENSE unit index; entries for units already gone are ignored. Helpers return a new plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prunekit.errors import PrunekitError
from prunekit.structure.plan import PruningPlan

ScoreRows = Sequence[Sequence[float] | torch.Tensor | None] | torch.Tensor
Counts = int | Sequence[int]


def kv_group_of(head: int, heads_per_group: int) -> int:
    """The KV group (= KV head) a query head belongs to, in repeat_kv order."""
    return head // heads_per_group


def group_heads(group: int, heads_per_group: int) -> list[int]:
    """The query heads of KV group ``group``."""
    return list(range(group * heads_per_group, (group + 1) * heads_per_group))


def group_scores(head_scores: Sequence[float] | torch.Tensor, heads_per_group: int) -> list[float]:
    """Score of each KV group = sum of its g query-head scores (the README's default aggregation)."""
    scores = _float_row(head_scores, None, "head scores")
    if len(scores) % heads_per_group:
        raise PrunekitError(f"{len(scores)} head scores do not split into groups of {heads_per_group}")
    return [math.fsum(scores[j : j + heads_per_group]) for j in range(0, len(scores), heads_per_group)]


def lowest(scores: Sequence[float] | torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, lowest first; ties go to the lower index first."""
    row = _float_row(scores, None, "scores")
    if not 0 <= count <= len(row):
        raise PrunekitError(f"cannot pick {count} of {len(row)} units")
    return sorted(range(len(row)), key=lambda unit: (row[unit], unit))[:count]


def top_k(scores: Sequence[float] | torch.Tensor, k: int) -> list[int]:
    """Sorted indices of the ``k`` units to keep: all but the ``n - k`` lowest (same tie rule as ``lowest``)."""
    n = len(_float_row(scores, None, "scores"))
    removed = set(lowest(scores, n - k)) if 0 <= k <= n else None
    if removed is None:
        raise PrunekitError(f"cannot keep {k} of {n} units")
    return [unit for unit in range(n) if unit not in removed]


def prune_kv_groups(
    plan: PruningPlan,
    scores: ScoreRows,
    *,
    per_layer: Sequence[int] | None = None,
    total: int | None = None,
    scores_are: str = "heads",
    min_groups: int = 1,
) -> PruningPlan:
    """Remove whole KV groups. ``scores``: one row per dense layer, of query-head scores (``scores_are="heads"``,
    summed per group) or of group scores (``"groups"``); rows of layers without attention may be None."""
    if scores_are not in ("heads", "groups"):
        raise PrunekitError(f"scores_are must be 'heads' or 'groups', not {scores_are!r}")
    plan = plan.copy()
    g, n_kv = plan.heads_per_group, plan.dense["num_kv_heads"]
    candidates: dict[int, list[tuple[float, int]]] = {}
    for index, layer in enumerate(plan.layers):
        if layer.has_attention:
            row = score_row(scores, index, plan.dense["num_heads"] if scores_are == "heads" else n_kv)
            row = group_scores(row, g) if scores_are == "heads" else row
            candidates[index] = [(row[group], group) for group in layer.kept_kv_heads]
    removed = _choose(candidates, per_layer, total, min_groups, len(plan.layers), "KV groups")
    for index, groups in removed.items():
        if groups:
            kept = [group for group in plan.layers[index].kept_kv_heads if group not in groups]
            plan.keep_kv_groups(index, kept)  # an empty list removes the attention block (min_groups=0)
    return plan


def prune_q_heads(plan: PruningPlan, scores: ScoreRows, *, per_group: Counts) -> PruningPlan:
    """q-head mode: in each layer remove ``per_group`` query heads from EVERY kept KV group (its lowest-scored
    ones); k/v stay. ``per_group``: one count for all layers with attention, or one per dense layer."""
    plan = plan.copy()
    g = plan.heads_per_group
    counts = _per_layer_counts(per_group, len(plan.layers), "per_group")
    for index, layer in enumerate(plan.layers):
        if not layer.has_attention:
            if counts[index] and not isinstance(per_group, int):
                raise PrunekitError(f"plan layer {index}: attention is removed; its per_group count must be 0")
            continue
        if not counts[index]:
            continue
        row = score_row(scores, index, plan.dense["num_heads"])
        kept: list[int] = []
        for group in layer.kept_kv_heads:
            heads = [head for head in layer.kept_heads if kv_group_of(head, g) == group]
            if counts[index] >= len(heads):
                raise PrunekitError(
                    f"plan layer {index}: cannot remove {counts[index]} of the {len(heads)} query heads of each "
                    "KV group (keep at least 1; remove the attention block instead)"
                )
            dropped = set(sorted(heads, key=lambda head: (row[head], head))[: counts[index]])
            kept += [head for head in heads if head not in dropped]
        plan.keep_heads(index, kept)
    return plan


def prune_channels(
    plan: PruningPlan,
    scores: ScoreRows,
    *,
    per_layer: Sequence[int] | None = None,
    total: int | None = None,
    min_channels: int = 1,
) -> PruningPlan:
    """Remove the lowest-scored FFN channels (``per_layer`` counts or a model-wide ``total``); with
    ``min_channels=0`` a layer that loses every channel loses its MLP block."""
    plan = plan.copy()
    candidates: dict[int, list[tuple[float, int]]] = {}
    for index, layer in enumerate(plan.layers):
        if layer.has_mlp:
            row = score_row(scores, index, plan.dense["intermediate_size"])
            candidates[index] = [(row[channel], channel) for channel in layer.kept_channels]
    removed = _choose(candidates, per_layer, total, min_channels, len(plan.layers), "FFN channels")
    for index, channels in removed.items():
        if channels:
            plan.keep_channels(index, [c for c in plan.layers[index].kept_channels if c not in channels])
    return plan


# -- shared machinery ----------------------------------------------------------------------------------------
def _choose(
    candidates: dict[int, list[tuple[float, int]]],
    per_layer: Sequence[int] | None,
    total: int | None,
    minimum: int,
    num_layers: int,
    what: str,
) -> dict[int, set[int]]:
    """Which units to remove per layer: the lowest (score, layer, unit), never leaving fewer than ``minimum``."""
    if (per_layer is None) == (total is None):
        raise PrunekitError(f"give exactly one of per_layer= or total= for the {what} to remove")
    if total is not None and total < 0:
        raise PrunekitError(f"the number of {what} to remove must be >= 0, not {total}")
    if minimum < 0:
        raise PrunekitError(f"the minimum number of {what} to keep must be >= 0, not {minimum}")
    if per_layer is not None:
        return _choose_per_layer(candidates, _per_layer_counts(per_layer, num_layers, "per_layer"), minimum, what)
    ranking = sorted((score, index, unit) for index, units in candidates.items() for score, unit in units)
    left = {index: len(units) for index, units in candidates.items()}
    removed: dict[int, set[int]] = {index: set() for index in candidates}
    achieved = 0
    for _, index, unit in ranking:
        if achieved == total:
            break
        if left[index] > minimum:
            removed[index].add(unit)
            left[index] -= 1
            achieved += 1
    if achieved != total:
        raise PrunekitError(
            f"cannot remove {total} {what}: only {achieved} can go while keeping {minimum} per layer"
        )
    return removed


def _choose_per_layer(
    candidates: dict[int, list[tuple[float, int]]], counts: list[int], minimum: int, what: str
) -> dict[int, set[int]]:
    removed: dict[int, set[int]] = {}
    for index, count in enumerate(counts):
        units = candidates.get(index)
        if units is None:
            if count:
                raise PrunekitError(f"plan layer {index}: the block is removed, so it cannot lose {count} {what}")
            continue
        if count > len(units) - minimum:
            raise PrunekitError(
                f"plan layer {index}: cannot remove {count} of its {len(units)} {what} while keeping {minimum}"
            )
        removed[index] = {unit for _, unit in sorted(units)[:count]}
    return removed


def _per_layer_counts(counts: Counts, num_layers: int, name: str) -> list[int]:
    values = [counts] * num_layers if isinstance(counts, int) else [int(count) for count in counts]
    if len(values) != num_layers:
        raise PrunekitError(f"{name} has {len(values)} entries but the plan has {num_layers} layers")
    if any(value < 0 for value in values):
        raise PrunekitError(f"{name} counts must be >= 0, got {values}")
    return values


def score_row(scores: ScoreRows, index: int, expected: int) -> list[float]:
    """Layer ``index``'s scores as floats, checked: present, ``expected`` long, finite."""
    if index >= len(scores) or scores[index] is None:
        raise PrunekitError(f"no scores given for plan layer {index}")
    return _float_row(scores[index], expected, f"scores of plan layer {index}")


def _float_row(values: Sequence[float] | torch.Tensor, expected: int | None, what: str) -> list[float]:
    tensor = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    row = tensor.to(torch.float64).flatten().tolist()
    if expected is not None and len(row) != expected:
        raise PrunekitError(f"{what} has {len(row)} entries, expected {expected}")
    if not all(math.isfinite(value) for value in row):
        raise PrunekitError(f"{what} contain NaN or infinite values")
    return row
