"""Per-layer pruning ratios: SlimGPT's incremental (log-increasing) schedule, the uniform ablation, and the
conversion of one layer's ratio into whole units (KV groups or query heads, and FFN channels).

Incremental Pruning Ratio (SlimGPT 2.5): ``r_l = r_0 + (r_last - r_0) · log(l + 1) / log(n)``. The paper does not
state ``r_0`` and ``r_last``; prunekit's rule (from the method spec) is ``r_0 = 0`` and ``r_last`` solved so that
the mean of the (capped) ``r_l`` equals the layer-weight target, with ``r_l <= 0.9``. It uses ``log(n)`` for the
model's depth (the released driver hard-codes ``log(32)``, wrong for other depths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter

RATIO_CAP = 0.9


def uniform_ratios(num_layers: int, target: float) -> list[float]:
    _check_target(target)
    return [target] * num_layers


def log_increasing_ratios(num_layers: int, target: float, first: float = 0.0, cap: float = RATIO_CAP) -> list[float]:
    """Per-layer ratios rising with log(l + 1) whose capped mean equals ``target`` (solved by bisection)."""
    _check_target(target)
    if num_layers == 1:
        return [target]
    shape = [math.log(index + 1) / math.log(num_layers) for index in range(num_layers)]

    def ratios(last: float) -> list[float]:
        return [min(cap, first + (last - first) * s) for s in shape]

    if sum(ratios(1e6)) / num_layers < target:
        raise PrunekitError(
            f"a log-increasing schedule from {first:g} capped at {cap:g} cannot remove {target:.1%} of layer weights; "
            "lower the ratio or use --schedule uniform"
        )
    low, high = first, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(ratios(middle)) / num_layers < target else (low, middle)
    return ratios(high)


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise PrunekitError(f"pruning ratio {target} is out of range; give a value in [0, 1)")


@dataclass(frozen=True)
class LayerCounts:
    """How many attention units and FFN channels one layer loses."""

    attention_units: int  # KV groups (or query heads per group in q-head mode)
    channels: int


def unit_counts(
    ratio: float, adapter: ArchAdapter, q_head_mode: bool = False, match_parameters: bool = True
) -> LayerCounts:
    """Round a layer's ratio to whole units.

    Attention units are rounded to the nearest count (keeping at least one group, or one head per group). With
    ``match_parameters`` (default, spec open point 2) the channel count is then set so the layer's removed weights
    match ``ratio`` as closely as whole channels allow: with only 3 KV groups per layer (SmolLM2) the rounding of
    heads alone would be far off. Without it, both unit types use ``ratio`` directly (the paper's behaviour).
    """
    d, dh, g = adapter.hidden_size, adapter.head_dim, adapter.heads_per_group
    if q_head_mode:
        units_available, unit_weights = g - 1, adapter.num_kv_heads * 2 * d * dh  # one q head from every group
    else:
        units_available, unit_weights = adapter.num_kv_heads - 1, d * dh * (2 * g + 2)
    total_units = g if q_head_mode else adapter.num_kv_heads
    units = min(units_available, round(ratio * total_units))
    channel_weights = 3 * d
    if not match_parameters:
        return LayerCounts(units, min(adapter.intermediate_size - 1, round(ratio * adapter.intermediate_size)))
    attention_weights = (2 * adapter.num_heads + 2 * adapter.num_kv_heads) * d * dh
    layer_weights = attention_weights + adapter.intermediate_size * channel_weights
    remaining = ratio * layer_weights - units * unit_weights
    channels = round(remaining / channel_weights)
    return LayerCounts(units, max(0, min(adapter.intermediate_size - 1, channels)))
