"""Parameter accounting: how big a model is, and how much a plan removes, in both published definitions.

``methods/README.md`` ("Pruning ratio"): every run reports both

- ratio_all = 1 - P(pruned) / P(dense), P = every parameter counted once per tensor (a tied embedding / lm_head
  counts once; embeddings, head, norms and biases included; a removed sub-block's norms count as removed);
- ratio_layers = share of the decoder layers' q, k, v, o, gate, up, down weight entries removed (no biases, norms,
  embeddings or head).

Counts can be *measured* on a model (dense or materialised) or *predicted* from a plan and the dense adapter,
without materialising anything, so a method can hit a target ratio before it slices. The two must agree; the tests
check it for every family. What one unit costs is written once, in ``structure.costs``; biases a method adds
(``plan.added_biases``) count as parameters of the pruned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from prunekit.models.adapters import ArchAdapter, linear_weight_count, unique_parameter_count
from prunekit.structure.blocks import is_removed
from prunekit.structure.costs import CHANNEL, KV_HEAD, QUERY_HEAD, UnitCosts
from prunekit.structure.plan import LayerPlan, PruningPlan


@dataclass(frozen=True)
class ParameterCounts:
    """``total``: every unique parameter; ``layer_linear``: decoder-layer q/k/v/o/gate/up/down weight entries."""

    total: int
    layer_linear: int

    def to_dict(self) -> dict[str, int]:
        return {"total": self.total, "layer_linear": self.layer_linear}


@dataclass(frozen=True)
class PruningRatios:
    """Dense and pruned counts, and the two ratios derived from them."""

    dense: ParameterCounts
    pruned: ParameterCounts

    @property
    def ratio_all(self) -> float:
        return 1.0 - self.pruned.total / self.dense.total

    @property
    def ratio_layers(self) -> float:
        return 1.0 - self.pruned.layer_linear / self.dense.layer_linear if self.dense.layer_linear else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_parameters": self.dense.total,
            "pruned_parameters": self.pruned.total,
            "dense_layer_linear_weights": self.dense.layer_linear,
            "pruned_layer_linear_weights": self.pruned.layer_linear,
            "ratio_all": self.ratio_all,
            "ratio_layers": self.ratio_layers,
        }


# -- measured ------------------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> int:
    """Unique parameters of ``model`` (a tied embedding / lm_head matrix counts once)."""
    return unique_parameter_count(model)


def counted_parameters(model: nn.Module, adapter: ArchAdapter) -> ParameterCounts:
    """Measure a dense or materialised model. ``adapter``: the dense model's (it only supplies module names)."""
    layer_linear = 0
    for layer in adapter.decoder_layers(model):
        if not is_removed(adapter.attention(layer)):
            layer_linear += linear_weight_count(adapter.attention_linears(layer))
        if not is_removed(adapter.mlp(layer)):
            layer_linear += linear_weight_count(adapter.mlp_linears(layer))
    return ParameterCounts(total=count_parameters(model), layer_linear=layer_linear)


def measured_ratios(model: nn.Module, adapter: ArchAdapter) -> PruningRatios:
    """Ratios of a materialised ``model`` against the dense model that ``adapter`` describes."""
    return PruningRatios(dense=dense_parameter_counts(adapter), pruned=counted_parameters(model, adapter))


# -- predicted -----------------------------------------------------------------------------------------------
def plan_parameter_counts(plan: PruningPlan, adapter: ArchAdapter) -> ParameterCounts:
    """Counts of the model ``plan`` would produce from the dense model of ``adapter``, without building it."""
    plan.validate(adapter)
    d, vocab = adapter.hidden_size, adapter.vocab_size
    total = vocab * d * (1 if adapter.tied_embeddings else 2) + d  # embeddings, lm_head, final norm
    layer_linear = 0
    for layer in plan.layers:
        layer_total, layer_weights = _layer_counts(layer, adapter, plan.added_biases)
        total += layer_total
        layer_linear += layer_weights
    return ParameterCounts(total=total, layer_linear=layer_linear)


def dense_parameter_counts(adapter: ArchAdapter) -> ParameterCounts:
    return plan_parameter_counts(PruningPlan.keep_all(adapter), adapter)


def predicted_ratios(plan: PruningPlan, adapter: ArchAdapter) -> PruningRatios:
    """The ratios ``plan`` will reach once materialised."""
    return PruningRatios(dense=dense_parameter_counts(adapter), pruned=plan_parameter_counts(plan, adapter))


def _layer_counts(layer: LayerPlan, adapter: ArchAdapter, added_biases: list[str] = ()) -> tuple[int, int]:
    """(all parameters, linear weight entries) of one planned layer; a removed block takes its norms along."""
    d, dh, costs = adapter.hidden_size, adapter.head_dim, UnitCosts.of(adapter)
    total = weights = 0
    if layer.has_attention:
        n_q, n_kv = len(layer.kept_heads), len(layer.kept_kv_heads)
        attention_weights = n_q * costs.weights(QUERY_HEAD) + n_kv * costs.weights(KV_HEAD)
        biases = n_q * costs.biases(QUERY_HEAD) + n_kv * costs.biases(KV_HEAD)
        biases += d if adapter.o_proj_bias or "o_proj" in added_biases else 0
        norms = d * len(adapter.spec.attention_norms) + dh * len(adapter.spec.qk_norms)
        total += attention_weights + biases + norms
        weights += attention_weights
    if layer.has_mlp:
        channels = len(layer.kept_channels)
        mlp_weights = channels * costs.weights(CHANNEL)
        biases = channels * costs.biases(CHANNEL) + (d if adapter.mlp_bias or "down_proj" in added_biases else 0)
        total += mlp_weights + biases + d * len(adapter.spec.mlp_norms)
        weights += mlp_weights
    return total, weights
