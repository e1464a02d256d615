"""pgprune's parts against their definitions: budgets, projection, exact top-k, estimator, and the three exact
ways of computing a step's losses."""

import math

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.methods.base import Target
from prunekit.methods.pgprune.budget import compute_budgets
from prunekit.methods.pgprune.estimator import EstimatorSettings, cosine_rate, gradient, update_baseline
from prunekit.methods.pgprune.forwards import SampleForwards, row_losses
from prunekit.methods.pgprune.policy import Policy, project, sigmoid_map, top_k
from prunekit.structure.masks import UnitMask
from prunekit.structure.params import predicted_ratios
from tests.conftest import FAMILIES, make_tiny_model
from tests.methods.width_helpers import windows


# -- budgets ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("of", ["all", "linear"])
@pytest.mark.parametrize("ratio", [0.1, 0.3])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_budgets_meet_the_target_in_its_own_measure(family, ratio, of):
    model = make_tiny_model(family, 4, 2, layers=4, intermediate_size=192)
    adapter = prunekit.adapter_for(model)
    budgets = compute_budgets(adapter, Target(ratio, of), "kv_group")
    plan = PruningPlan_from_counts(adapter, budgets)
    measured = predicted_ratios(plan, adapter)
    achieved = measured.ratio_all if of == "all" else measured.ratio_layers
    channel_share = 3 * 64 / (measured.dense.total if of == "all" else measured.dense.layer_linear)
    assert abs(achieved - ratio) <= channel_share / 2 + 1e-9  # within half a channel of the goal


def PruningPlan_from_counts(adapter, budgets):
    """A plan keeping the budgeted counts (first units of every layer, spread evenly)."""
    masks = Policy({"attention": torch.rand(adapter.num_layers, adapter.num_kv_heads),
                    "channels": torch.rand(adapter.num_layers, adapter.intermediate_size)}, budgets).final_masks(
        {"attention": torch.zeros(adapter.num_layers, adapter.num_kv_heads),
         "channels": torch.zeros(adapter.num_layers, adapter.intermediate_size)})
    mask = UnitMask.from_kv_groups(masks["attention"], masks["channels"], torch.ones(adapter.num_layers),
                                   adapter.heads_per_group)
    return mask.to_plan(adapter)


def test_layer_share_takes_whole_layers_and_the_rest_as_width():
    adapter = prunekit.adapter_for(make_tiny_model("llama", 4, 2, layers=8))
    budgets = compute_budgets(adapter, Target(0.4, "linear"), "kv_group", layer_share=0.5)
    assert budgets.kept_layers == 8 - 1  # half of 40% of 8 layers is 1.6 layers: one whole layer
    width_removed = 1 - (budgets.kept_layers / 8) * budgets.channel_fraction
    assert width_removed == pytest.approx(0.4, abs=0.03)


def test_a_target_that_would_empty_the_layers_is_one_line():
    adapter = prunekit.adapter_for(make_tiny_model("llama", 4, 2, layers=2))
    with pytest.raises(PrunekitError, match="lower --ratio"):
        compute_budgets(adapter, Target(0.99, "linear"), "kv_group")


# -- projection and the final top-k ----------------------------------------------------------------------------
def test_projection_only_shifts_down_and_meets_the_budget():
    values = torch.tensor([0.9, 0.8, 0.75, 0.2, 1.3, -0.1])
    projected = project(values, 2.0)
    assert float(projected.sum()) <= 2.0 and float(projected.sum()) > 2.0 - 1e-3 - 1e-6
    assert torch.all(projected <= values.clamp(0, 1))
    assert torch.equal(project(torch.tensor([0.2, 0.3]), 1.0), torch.tensor([0.2, 0.3]))  # inequality: untouched
    inside = torch.tensor([0.5, 0.6, 0.7, 0.8])
    moved = project(inside, 2.0)  # every value stays inside (0, 1): one common shift v
    assert torch.allclose(inside - moved, torch.full((4,), float((inside - moved)[0])), atol=1e-6)


def test_top_k_is_exact_with_ties_and_breaks_them_by_init_score_then_index():
    probabilities = torch.full((3, 4), 0.5)
    ties = torch.zeros(3, 4)
    ties[2, 3] = 1.0
    keep = top_k(probabilities, ties, 5, floor=1)
    assert int(keep.sum()) == 5
    assert keep[2, 3] == 1  # the best init score wins the tie
    assert keep[2].tolist() == [0, 0, 0, 1]  # its row's floor is that unit
    assert keep[:2, 0].tolist() == [1, 1]  # the other rows' floors: their first by index
    assert keep[0, 1] == 1 and keep[0, 2] == 1 and keep[1, 1] == 0  # then the lowest layer and index


def test_top_k_keeps_a_unit_in_a_row_the_learner_would_empty_and_stays_exact():
    probabilities = torch.tensor([[0.9, 0.8, 0.7], [0.0, 0.0, 0.0], [0.95, 0.85, 0.6]])
    keep = top_k(probabilities, torch.zeros(3, 3), 4, floor=1)
    assert int(keep.sum()) == 4 and keep[1].sum() == 1
    assert keep[2, 2] == 0 and keep[0, 2] == 0  # the lowest-ranked units elsewhere made room
    with pytest.raises(ValueError):
        top_k(probabilities, torch.zeros(3, 3), 2, floor=1)


def test_sigmoid_map_is_standardise_sigmoid_shift_clamp():
    scores = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    mapped = sigmoid_map(scores, 0.75)
    z = (scores - scores.mean()) / scores.std()
    expected = (torch.sigmoid(z) - torch.sigmoid(z).mean() + 0.75).clamp(0, 1)
    assert torch.allclose(mapped, expected)


# -- estimator -------------------------------------------------------------------------------------------------
def test_gradient_estimate_follows_the_released_and_exact_formulas():
    s = {"channels": torch.tensor([0.3, 0.6, 0.9])}
    masks = [{"channels": torch.tensor([1.0, 0.0, 1.0])}, {"channels": torch.tensor([0.0, 1.0, 1.0])},
             {"channels": torch.tensor([1.0, 1.0, 0.0])}]
    losses, baseline = [2.0, 2.5, 3.5], 2.4
    for estimator, power in (("released", 0.5), ("exact", 1.0)):
        got = gradient(losses, masks, s, baseline, EstimatorSettings(estimator=estimator))["channels"]
        expected = torch.zeros(3)
        for loss, mask in zip(losses, masks, strict=True):
            expected += (loss - baseline) * (mask["channels"] - s["channels"]) / (
                s["channels"] * (1 - s["channels"]) + 1e-7) ** power
        assert torch.allclose(got, expected / 2)  # 1 / (K - 1)
    loo = gradient(losses, masks, s, 99.0, EstimatorSettings(baseline="leave_one_out"))["channels"]
    by_definition = torch.zeros(3)
    for loss, mask in zip(losses, masks, strict=True):
        others = (sum(losses) - loss) / 2
        by_definition += (loss - others) * (mask["channels"] - s["channels"]) / (
            s["channels"] * (1 - s["channels"]) + 1e-7).sqrt()
    assert torch.allclose(loo, by_definition / 3)  # 1 / K, baseline ignored


def test_baseline_and_schedule():
    assert update_baseline(None, 3.0, 5) == 3.0
    assert update_baseline(3.0, 4.0, 5) == pytest.approx(0.8 * 3.0 + 0.2 * 4.0)
    assert cosine_rate(0.01, 0, 100) == 0.01 and cosine_rate(0.01, 50, 100) == pytest.approx(0.005)
    assert cosine_rate(0.01, 100, 100) == pytest.approx(0.0, abs=1e-12)


# -- the three executions --------------------------------------------------------------------------------------
def _random_masks(adapter, unit, count, layer_units, seed):
    generator = torch.Generator().manual_seed(seed)
    per_layer = adapter.num_heads if unit == "q_head" else adapter.num_kv_heads
    masks = []
    for sample in range(count):
        attention = (torch.rand(adapter.num_layers, per_layer, generator=generator) < 0.6).float()
        channels = (torch.rand(adapter.num_layers, adapter.intermediate_size, generator=generator) < 0.6).float()
        if sample == 0:  # a block with nothing kept in one layer, and one in another
            attention[0] = 0.0
            channels[1] = 0.0
        mask = {"attention": attention, "channels": channels}
        if layer_units:
            mask["layers"] = torch.tensor([1.0, 0.0, 1.0])
        masks.append(mask)
    return masks


@pytest.mark.parametrize("layer_units", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_masked_batched_and_sliced_losses_agree(family, layer_units):
    kv_heads = 1 if family == "gemma3_text" else 2
    model = make_tiny_model(family, 4, kv_heads)
    adapter = prunekit.adapter_for(model)
    unit = "q_head" if kv_heads == 1 else "kv_group"
    masks = _random_masks(adapter, unit, 3, layer_units, seed=1)
    ids = windows(4, 20)
    results = {}
    for execution in ("masked", "batched", "sliced"):
        with SampleForwards(model, adapter, unit, execution) as forwards:
            results[execution] = forwards.losses(ids, masks)
    for execution in ("batched", "sliced"):
        assert results[execution] == pytest.approx(results["masked"], rel=1e-5), execution
    reference = []  # the materialised model of each mask
    for index, mask in enumerate(masks):
        pruned = make_tiny_model(family, 4, kv_heads)
        unit_mask = SampleForwards(pruned, adapter, unit, "masked").unit_mask(mask)
        if any(not row.any() for row in unit_mask.heads) or any(not row.any() for row in unit_mask.channels):
            continue  # an empty block is a depth plan, materialised elsewhere
        prunekit.apply_plan(pruned, unit_mask.to_plan(adapter))
        with torch.no_grad():
            logits = pruned(ids).logits
        reference.append((index, float(row_losses(logits, ids).mean())))
    assert reference  # at least the samples without an empty block were checked
    for index, loss in reference:
        assert results["masked"][index] == pytest.approx(loss, rel=1e-5)
    assert all(math.isfinite(loss) for loss in results["masked"])
