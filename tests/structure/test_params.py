"""Parameter accounting: predicted (plan + adapter) == counted (materialised model); both ratio definitions."""

import pytest

from prunekit.models.adapters import adapter_for
from prunekit.structure.costs import CHANNEL, KV_GROUP, QUERY_HEAD, UnitCosts
from prunekit.structure.gqa import prune_channels, prune_kv_groups, prune_q_heads
from prunekit.structure.materialize import apply_plan
from prunekit.structure.params import (
    count_parameters,
    counted_parameters,
    dense_parameter_counts,
    measured_ratios,
    plan_parameter_counts,
    predicted_ratios,
)
from prunekit.structure.plan import PruningPlan
from tests.conftest import FAMILIES, TINY_VOCAB, make_tiny_model
from tests.structure.common import MIXED_LAYERS, SHAPE_IDS, SHAPES, mixed_plan

VARIANTS = {
    "plain": {},
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    "biases": {"attention_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_predicted_counts_equal_counted_counts(family, heads, kv_heads, variant):
    model = make_tiny_model(family, heads, kv_heads, layers=MIXED_LAYERS, **VARIANTS[variant])
    adapter = adapter_for(model)
    assert dense_parameter_counts(adapter) == counted_parameters(model, adapter)
    assert dense_parameter_counts(adapter).total == count_parameters(model)
    plan = mixed_plan(adapter)
    predicted = predicted_ratios(plan, adapter)
    apply_plan(model, plan)
    assert plan_parameter_counts(plan, adapter) == counted_parameters(model, adapter) == predicted.pruned
    assert measured_ratios(model, adapter) == predicted
    assert 0 < predicted.ratio_all < predicted.ratio_layers < 1  # embeddings dilute ratio_all


def test_tied_embedding_counts_once():
    tied = make_tiny_model("llama", tie_word_embeddings=True)
    untied = make_tiny_model("llama", tie_word_embeddings=False)
    assert count_parameters(untied) - count_parameters(tied) == TINY_VOCAB * 64
    tied_adapter = adapter_for(tied)
    assert tied_adapter.tied_embeddings and dense_parameter_counts(tied_adapter).total == count_parameters(tied)


def test_ratios_by_hand():
    """3 llama layers, d=64, d_h=16, 4 heads / 2 KV, 96 channels, untied vocab 320; one MLP removed."""
    adapter = adapter_for(make_tiny_model("llama", 4, 2, tie_word_embeddings=False))
    d = 64
    attention, mlp = d * 16 * (2 * 4 + 2 * 2), 3 * d * 96
    layer = attention + mlp + 2 * d  # two norms
    dense_total = 3 * layer + 2 * TINY_VOCAB * d + d
    assert dense_parameter_counts(adapter).total == dense_total
    ratios = predicted_ratios(PruningPlan.from_block_removals(adapter, mlp=[1]), adapter)
    assert ratios.ratio_layers == pytest.approx(mlp / (3 * (attention + mlp)), abs=1e-15)
    assert ratios.ratio_all == pytest.approx((mlp + d) / dense_total, abs=1e-15)  # the pre-MLP norm goes too
    summary = ratios.to_dict()
    assert summary["dense_parameters"] == dense_total and summary["ratio_all"] == ratios.ratio_all


@pytest.mark.parametrize("variant", ["plain", "biases"])
def test_unit_weights_match_predicted_differences(variant):
    adapter = adapter_for(make_tiny_model("qwen2", 8, 2, head_dim=8, **VARIANTS[variant]))
    base = PruningPlan.keep_all(adapter)
    total = plan_parameter_counts(base, adapter).total
    ones = [[1.0] * 8] * 3
    one_group = prune_kv_groups(base, ones, per_layer=[1, 0, 0])
    costs = UnitCosts.of(adapter)
    assert total - plan_parameter_counts(one_group, adapter).total == costs.parameters(KV_GROUP)
    assert costs.weights(KV_GROUP) == 64 * 8 * (2 * 4 + 2)
    one_per_group = prune_q_heads(base, ones, per_group=[1, 0, 0])  # one query head from each of the 2 groups
    assert total - plan_parameter_counts(one_per_group, adapter).total == 2 * costs.parameters(QUERY_HEAD)
    channels = prune_channels(base, [[0.0] * 96] * 3, total=5)
    assert total - plan_parameter_counts(channels, adapter).total == 5 * costs.parameters(CHANNEL)
    assert costs.weights(CHANNEL) == 3 * 64
    assert costs.cost(KV_GROUP, "linear") == costs.weights(KV_GROUP)
    assert costs.cost(KV_GROUP, "all") - costs.weights(KV_GROUP) == (8 * 4 + 2 * 8 if adapter.attention_bias else 0)
