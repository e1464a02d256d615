"""Scores to valid width decisions: KV groups, q-head mode, channels; counts per layer or model-wide; ties."""

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from prunekit.structure.gqa import (
    group_heads,
    group_scores,
    kv_group_of,
    lowest,
    prune_channels,
    prune_kv_groups,
    prune_q_heads,
    top_k,
)
from prunekit.structure.plan import PruningPlan
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def gqa8():
    """3 layers, 8 query heads in 4 KV groups of 2 (g = 2), 96 channels."""
    return adapter_for(make_tiny_model("llama", heads=8, kv_heads=4, head_dim=8))


@pytest.fixture(scope="module")
def mqa():
    return adapter_for(make_tiny_model("gemma3_text", heads=4, kv_heads=1))


def test_group_arithmetic_follows_repeat_kv_order():
    assert [kv_group_of(h, 3) for h in range(6)] == [0, 0, 0, 1, 1, 1]
    assert group_heads(1, 3) == [3, 4, 5]
    assert group_scores([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3) == [6.0, 15.0]
    assert group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2) == [3.0, 7.0]


def test_ties_go_to_the_lower_index_and_top_k_is_the_complement():
    assert lowest([3.0, 1.0, 1.0, 0.5], 3) == [3, 1, 2]
    assert top_k([3.0, 1.0, 1.0, 0.5], 2) == [0, 2]  # of the tied 1.0s, the lower index goes first
    assert top_k([0.0] * 4, 1) == [3]
    with pytest.raises(PrunekitError, match="cannot keep 5 of 4"):
        top_k([0.0] * 4, 5)


def test_kv_groups_per_layer_sum_head_scores(gqa8):
    plan = PruningPlan.keep_all(gqa8)
    # group sums: layer 0 [3, 7, 11, 1] -> drop groups 3, 0; layer 1 ties everywhere -> drop group 0
    head_scores = [[1, 2, 3, 4, 5, 6, 0, 1], [1] * 8, [9] * 8]
    pruned = prune_kv_groups(plan, head_scores, per_layer=[2, 1, 0])
    assert pruned.layers[0].kept_kv_heads == [1, 2] and pruned.layers[0].kept_heads == [2, 3, 4, 5]
    assert pruned.layers[1].kept_kv_heads == [1, 2, 3]
    assert pruned.layers[2] == plan.layers[2]
    assert plan.layers[0].kept_kv_heads == [0, 1, 2, 3]  # the input plan is untouched
    pruned.validate(gqa8)
    by_groups = prune_kv_groups(plan, [[3, 7, 11, 1], [2] * 4, [18] * 4], per_layer=[2, 1, 0], scores_are="groups")
    assert by_groups == pruned


def test_kv_groups_model_wide_total_keeps_a_group_per_layer_and_breaks_ties_by_layer(gqa8):
    plan = PruningPlan.keep_all(gqa8)
    scores = [[0.0, 0.0, 0.0, 0.0], [1.0, 5.0, 5.0, 5.0], [1.0, 5.0, 5.0, 5.0]]
    pruned = prune_kv_groups(plan, scores, total=6, scores_are="groups")
    # layer 0's four zeros: only three may go; then both 1.0s; of the tied 5.0s, layer 1's group 1 goes first
    assert [lp.kept_kv_heads for lp in pruned.layers] == [[3], [2, 3], [1, 2, 3]]
    with pytest.raises(PrunekitError, match="cannot remove 10 KV groups: only 9 can go while keeping 1 per layer"):
        prune_kv_groups(plan, scores, total=10, scores_are="groups")
    everything = prune_kv_groups(plan, scores, total=12, scores_are="groups", min_groups=0)
    assert all(not lp.has_attention for lp in everything.layers)


def test_mqa_needs_q_head_mode(mqa):
    plan = PruningPlan.keep_all(mqa)
    scores = [[4.0, 1.0, 3.0, 2.0]] * 3
    with pytest.raises(PrunekitError, match="plan layer 0: cannot remove 1 of its 1 KV groups while keeping 1"):
        prune_kv_groups(plan, scores, per_layer=[1, 0, 0])
    gone = prune_kv_groups(plan, scores, per_layer=[1, 0, 0], min_groups=0)
    assert not gone.layers[0].has_attention and gone.layers[0].has_mlp
    pruned = prune_q_heads(plan, scores, per_group=[2, 1, 0])
    assert [lp.kept_heads for lp in pruned.layers] == [[0, 2], [0, 2, 3], [0, 1, 2, 3]]
    assert all(lp.kept_kv_heads == [0] for lp in pruned.layers)
    pruned.validate(mqa)


def test_q_head_mode_removes_the_same_number_from_every_group(gqa8):
    plan = prune_kv_groups(PruningPlan.keep_all(gqa8), [[1] * 8] * 3, per_layer=[1, 0, 0])  # layer 0: groups 1..3
    scores = [[0, 0, 5, 4, 1, 2, 7, 7], [3, 1, 2, 4, 6, 5, 1, 1], [0] * 8]
    pruned = prune_q_heads(plan, scores, per_group=1)
    assert pruned.layers[0].kept_heads == [2, 5, 7]  # group 1 drops head 3, group 2 head 4, group 3 tie -> head 6
    assert pruned.layers[1].kept_heads == [0, 3, 4, 7]
    assert pruned.layers[2].kept_heads == [1, 3, 5, 7]
    pruned.validate(gqa8)
    with pytest.raises(PrunekitError, match="plan layer 0: cannot remove 1 of the 1 query heads of each KV group"):
        prune_q_heads(pruned, scores, per_group=[1, 0, 0])


def test_channels_per_layer_and_total(gqa8):
    plan = PruningPlan.keep_all(gqa8)
    plan.remove_mlp(2)
    scores = [torch.arange(96.0), torch.arange(96.0).flip(0), None]  # no scores needed where the MLP is gone
    pruned = prune_channels(plan, scores, per_layer=[90, 90, 0])
    assert pruned.layers[0].kept_channels == list(range(90, 96))
    assert pruned.layers[1].kept_channels == list(range(6))
    total = prune_channels(plan, [torch.zeros(96), torch.ones(96), None], total=100)
    assert len(total.layers[0].kept_channels) == 1 and len(total.layers[1].kept_channels) == 91
    emptied = prune_channels(plan, scores, per_layer=[96, 0, 0], min_channels=0)
    assert not emptied.layers[0].has_mlp
    emptied.validate(gqa8)


@pytest.mark.parametrize("call,message", [
    (lambda p: prune_channels(p, [[0.0] * 96] * 3, per_layer=[1, 1, 1], total=3), "exactly one of per_layer="),
    (lambda p: prune_channels(p, [[0.0] * 95] * 3, total=3), "scores of plan layer 0 has 95 entries, expected 96"),
    (lambda p: prune_kv_groups(p, [[float("nan")] * 8] * 3, total=1), "contain NaN"),
    (lambda p: prune_kv_groups(p, [[0.0] * 8] * 2, total=1), "no scores given for plan layer 2"),
    (lambda p: prune_q_heads(p, [[0.0] * 8] * 3, per_group=[1, 1]), "per_group has 2 entries but the plan has 3"),
    (lambda p: prune_kv_groups(p, [[0.0] * 8] * 3, total=1, scores_are="head"), "scores_are must be"),
])
def test_helpers_reject_bad_arguments(gqa8, call, message):
    with pytest.raises(PrunekitError, match=message):
        call(PruningPlan.keep_all(gqa8))
