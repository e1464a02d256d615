"""Keep budgets of a policy-gradient run: the target as exact unit counts, and the fractions learning uses.

The spec's budgets are k_A = κ·|A| attention units and k_F = κ·|F| channels with one keep fraction κ for both
types, κ = 1 − ratio_layers (heads and channels at the same fraction keep the attention : MLP split). Here the
target is converted in the measure it was given in (``of="all"``: all parameters, biases included; ``"linear"``:
layer linear weights): the attention units are rounded to a whole count at κ, then the channel count is set so the
removed parameters are as close to the goal as whole channels allow (as the shared allocator's
``match_parameters`` does per layer). With only 3 KV groups per layer (SmolLM2, 90 in all) rounding the attention
units alone moves the result by up to 0.15 % of the layer weights, which the channels absorb.

With layer units on, ``layer_share`` of the goal is taken as whole decoder layers (rounded down to whole layers, so
the layers never overshoot the goal; at least one layer stays) and the rest as heads and channels of the kept
layers. Learning uses the same keep fractions over every layer's units (a layer's presence and its width are sampled
independently), so the expected kept count of each type is its budget whenever the layer budget is met.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunekit.errors import PrunekitError
from prunekit.methods.base import Target
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.costs import CHANNEL, KV_GROUP, QUERY_HEAD, UnitCosts
from prunekit.structure.params import dense_parameter_counts, plan_parameter_counts
from prunekit.structure.plan import PruningPlan


@dataclass(frozen=True)
class Budgets:
    """Exact kept counts of the final plan and the per-type keep fractions learning projects onto."""

    attention_per_layer: int  # units per dense layer: KV groups, or query heads (one-KV-head models)
    channels_per_layer: int
    num_layers: int
    kept_layers: int
    kept_attention: int  # over the kept layers
    kept_channels: int

    @property
    def attention_fraction(self) -> float:
        return self.kept_attention / (self.kept_layers * self.attention_per_layer)

    @property
    def channel_fraction(self) -> float:
        return self.kept_channels / (self.kept_layers * self.channels_per_layer)

    @property
    def layer_fraction(self) -> float:
        return self.kept_layers / self.num_layers

    def to_dict(self) -> dict:
        return {"kept_layers": self.kept_layers, "kept_attention_units": self.kept_attention,
                "kept_channels": self.kept_channels, "attention_keep_fraction": self.attention_fraction,
                "channel_keep_fraction": self.channel_fraction, "layer_keep_fraction": self.layer_fraction}


def attention_unit_cost(adapter: ArchAdapter, attention_unit: str, of: str) -> int:
    costs = UnitCosts.of(adapter)
    return costs.cost(QUERY_HEAD if attention_unit == "q_head" else KV_GROUP, of)


def layer_cost(adapter: ArchAdapter, of: str) -> int:
    """What removing one whole decoder layer removes, in the target's measure (every layer is alike)."""
    plan = PruningPlan.keep_all(adapter)
    plan.remove_layer(0)
    dense, without = dense_parameter_counts(adapter), plan_parameter_counts(plan, adapter)
    return (dense.total - without.total) if of == "all" else (dense.layer_linear - without.layer_linear)


def compute_budgets(adapter: ArchAdapter, target: Target, attention_unit: str, layer_share: float = 0.0) -> Budgets:
    """The exact counts for ``target`` (see the module docstring); ``layer_share`` > 0 only with layer units."""
    per_layer = adapter.num_heads if attention_unit == "q_head" else adapter.num_kv_heads
    d_ff, layers = adapter.intermediate_size, adapter.num_layers
    target.layer_linear_ratio(adapter)  # a target the layers cannot give is refused in the usual words
    dense = dense_parameter_counts(adapter)
    goal = target.ratio * (dense.total if target.of == "all" else dense.layer_linear)
    removed_layers = min(layers - 1, int(layer_share * goal // layer_cost(adapter, target.of)))
    rest = goal - removed_layers * layer_cost(adapter, target.of)
    kept_layers = layers - removed_layers
    unit_cost, channel_cost = attention_unit_cost(adapter, attention_unit, target.of), UnitCosts.of(adapter).cost(
        CHANNEL, target.of)
    width_cost = kept_layers * (per_layer * unit_cost + d_ff * channel_cost)
    if rest > width_cost - kept_layers * (unit_cost + channel_cost):
        raise PrunekitError(f"--ratio {target.ratio} would leave the kept layers without a head or a channel; "
                            "lower --ratio")
    removed_attention = min(kept_layers * (per_layer - 1), max(0, round(rest / width_cost * kept_layers * per_layer)))
    removed_channels = round((rest - removed_attention * unit_cost) / channel_cost)
    removed_channels = min(kept_layers * (d_ff - 1), max(0, removed_channels))
    return Budgets(per_layer, d_ff, layers, kept_layers, kept_layers * per_layer - removed_attention,
                   kept_layers * d_ff - removed_channels)
