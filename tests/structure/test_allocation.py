"""The width allocator: per-layer ratio schedules, rounding to whole units, the attention unit, global allocation."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from prunekit.structure.allocation import (
    UnitScores,
    allocate,
    layer_counts,
    resolve_attention_unit,
    select_global,
)
from prunekit.structure.costs import CHANNEL, KV_GROUP, QUERY_HEAD, UnitCosts
from prunekit.structure.params import dense_parameter_counts, plan_parameter_counts
from prunekit.structure.plan import PruningPlan
from prunekit.structure.schedules import layer_range_ratios, layer_ratios, log_increasing_ratios, uniform_ratios
from tests.conftest import make_tiny_model


@pytest.mark.parametrize("target,last", [(0.20, 0.272), (0.25, 0.340), (0.33, 0.449), (0.50, 0.680)])
def test_published_last_layer_ratios_for_32_layers(target, last):
    ratios = log_increasing_ratios(32, target)
    assert ratios[0] == 0.0 and ratios[-1] == pytest.approx(last, abs=1e-3)
    assert sum(ratios) / 32 == pytest.approx(target, abs=1e-9)
    assert ratios == sorted(ratios)


def test_cap_is_respected_and_mean_still_hits_target():
    ratios = log_increasing_ratios(30, 0.7)
    assert max(ratios) == pytest.approx(0.9)
    assert sum(ratios) / 30 == pytest.approx(0.7, abs=1e-9)


def test_infeasible_and_out_of_range_targets():
    with pytest.raises(PrunekitError, match="cannot remove"):
        log_increasing_ratios(30, 0.89)
    with pytest.raises(PrunekitError, match="out of range"):
        uniform_ratios(30, 1.2)


def test_first_ratio_above_the_target_is_an_error_not_a_flat_schedule():
    with pytest.raises(PrunekitError, match="first_ratio 0.3 is above the target 20.00%"):
        log_increasing_ratios(30, 0.2, first=0.3)
    assert log_increasing_ratios(30, 0.2, first=0.2) == pytest.approx([0.2] * 30)  # the edge case stays exact


def test_released_schedule_with_both_ends_given():
    """SlimGPT's released LLaMA-7B run: 0.0625 -> 0.25 over 32 layers, a mean of 20.04%."""
    ratios = layer_ratios(32, 0.2, "log_increase", first=0.0625, last=0.25)
    assert ratios[0] == 0.0625 and ratios[-1] == pytest.approx(0.25)
    assert sum(ratios) / 32 == pytest.approx(0.0625 + 0.1875 * 0.7354, abs=1e-4)
    with pytest.raises(PrunekitError, match="remove 20.04% of layer weights over 32 layers, not the target 30.00%"):
        layer_ratios(32, 0.3, "log_increase", first=0.0625, last=0.25)


def test_layer_range_keeps_the_ends_and_hits_the_target():
    ratios = layer_range_ratios(32, 0.2)  # LLaMA-7B: layers 4..29 pruned
    assert ratios[:4] == [0.0] * 4 and ratios[-2:] == [0.0, 0.0] and len(set(ratios[4:30])) == 1
    assert sum(ratios) / 32 == pytest.approx(0.2)
    assert layer_range_ratios(30, 0.2)[:4] == [0.0] * 4  # SmolLM2: ceil(30/8) = 4, ceil(30/16) = 2
    with pytest.raises(PrunekitError, match="above the cap"):
        layer_range_ratios(8, 0.6, keep_first=2, keep_last=2)
    with pytest.raises(PrunekitError, match="unknown schedule 'steps'"):
        layer_ratios(8, 0.2, "steps")


def test_layer_counts_match_layer_parameters():
    adapter = adapter_for(make_tiny_model("llama", heads=8, kv_heads=4))  # d 64, dh 16, g 2, d_ff 96
    counts = layer_counts(0.4, adapter)
    layer = (2 * 8 + 2 * 4) * 64 * 16 + 96 * 3 * 64
    removed = counts.attention_units * 64 * 16 * 6 + counts.channels * 3 * 64
    assert counts.attention_units == 2
    assert abs(removed - 0.4 * layer) <= 3 * 64 / 2
    paper = layer_counts(0.4, adapter, match_parameters=False)
    assert paper.channels == round(0.4 * 96)
    assert layer_counts(0.99, adapter).attention_units == 3  # at least one KV group stays
    q_heads = layer_counts(0.5, adapter, "q_head")  # one query head of each of the 4 groups
    assert q_heads.attention_units == 1


def test_attention_unit_is_resolved_and_checked_once():
    gqa, mqa, mha = (adapter_for(make_tiny_model("llama", heads=4, kv_heads=kv)) for kv in (2, 1, 4))
    assert resolve_attention_unit(gqa, "auto") == "kv_group" and resolve_attention_unit(mqa, "auto") == "q_head"
    assert resolve_attention_unit(gqa, "q_head") == "q_head"
    with pytest.raises(PrunekitError, match="one KV head would remove whole attention blocks"):
        resolve_attention_unit(mqa, "kv_group")
    with pytest.raises(PrunekitError, match="one query head per KV head"):
        resolve_attention_unit(mha, "q_head")
    with pytest.raises(PrunekitError, match="unknown attention_unit 'qhead'"):
        resolve_attention_unit(gqa, "qhead")


def _random_scores(adapter, unit, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = adapter.num_heads if unit == "q_head" else adapter.num_kv_heads
    attention = [torch.rand(width, generator=generator) for _ in range(adapter.num_layers)]
    channels = [torch.rand(adapter.intermediate_size, generator=generator) for _ in range(adapter.num_layers)]
    return UnitScores(attention, channels)


def _standardized(values):
    return (values - values.mean()) / values.std()


@pytest.mark.parametrize("unit,kv_heads", [("kv_group", 4), ("q_head", 2)])
@pytest.mark.parametrize("of", ["all", "linear"])
def test_global_allocation_removes_the_lowest_units_until_closest_to_the_budget(unit, kv_heads, of):
    model = make_tiny_model("qwen2", heads=8, kv_heads=kv_heads, layers=4)  # qwen2: q/k/v biases count in "all"
    adapter = adapter_for(model)
    scores = _random_scores(adapter, unit)
    plan = select_global(PruningPlan.keep_all(adapter), adapter, scores, 0.3, of, unit)
    dense, pruned = dense_parameter_counts(adapter), plan_parameter_counts(plan, adapter)
    measure = (lambda counts: counts.layer_linear) if of == "linear" else (lambda counts: counts.total)
    removed, goal = measure(dense) - measure(pruned), 0.3 * measure(dense)
    costs = UnitCosts.of(adapter)
    largest = max(costs.cost(KV_GROUP if unit == "kv_group" else QUERY_HEAD, of) * (kv_heads if unit == "q_head"
                                                                                      else 1), costs.cost(CHANNEL, of))
    assert abs(removed - goal) <= largest / 2
    # every removed channel scores (standardised in its layer) no higher than any kept channel that was free to go
    removed_scores, kept_scores = [], []
    for index, layer in enumerate(plan.layers):
        z = _standardized(scores.channels[index].double())
        removed_scores += [float(z[c]) for c in range(96) if c not in layer.kept_channels]
        kept_scores += [float(z[c]) for c in layer.kept_channels]
        assert len(layer.kept_kv_heads) >= 1 and layer.kept_channels
    assert removed_scores and max(removed_scores) <= min(kept_scores)


def test_global_allocation_respects_floors_and_can_take_heads_before_channels():
    adapter = adapter_for(make_tiny_model("llama", heads=4, kv_heads=4, layers=2))
    attention = [torch.tensor([-50.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    channels = [torch.arange(96, dtype=torch.float32)] * 2
    plan = select_global(PruningPlan.keep_all(adapter), adapter, UnitScores(attention, channels), 0.05, "linear",
                         "kv_group", standardize=False)
    assert plan.layers[0].kept_kv_heads == [1, 2, 3]  # the -50 group goes first, before any channel
    everything = select_global(PruningPlan.keep_all(adapter), adapter, UnitScores(attention, channels), 0.99,
                               "linear", "kv_group", standardize=False, min_groups=2, min_channels=10)
    assert [len(layer.kept_kv_heads) for layer in everything.layers] == [2, 2]
    assert [len(layer.kept_channels) for layer in everything.layers] == [10, 10]


def test_allocate_by_name_and_unknown_mode():
    adapter = adapter_for(make_tiny_model("llama", heads=4, kv_heads=2, layers=8))
    scores = _random_scores(adapter, "kv_group")
    plan = allocate(PruningPlan.keep_all(adapter), adapter, scores, 0.3, "layer_range")
    untouched = [index for index, layer in enumerate(plan.layers) if len(layer.kept_channels) == 96]
    assert untouched == [0, 7]  # ceil(8/8) first, ceil(8/16) last
    uniform = allocate(PruningPlan.keep_all(adapter), adapter, scores, 0.3, "uniform")
    assert len({len(layer.kept_channels) for layer in uniform.layers}) == 1
    with pytest.raises(PrunekitError, match="unknown allocation 'even'"):
        allocate(PruningPlan.keep_all(adapter), adapter, scores, 0.3, "even")
