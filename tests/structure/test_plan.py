"""The pruning plan: builders, validation (one-line errors naming the layer), JSON round-trip."""

import json

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from prunekit.structure.plan import LayerPlan, PruningPlan
from tests.conftest import FAMILIES, make_tiny_model
from tests.structure.common import MIXED_LAYERS, SHAPE_IDS, SHAPES, mixed_plan


@pytest.fixture(scope="module")
def gqa8():
    """8 query heads in 2 KV groups of 4, 3 layers."""
    return adapter_for(make_tiny_model("llama", heads=8, kv_heads=2, head_dim=8))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES, ids=SHAPE_IDS)
def test_keep_all_and_mixed_plans_are_valid(family, heads, kv_heads):
    adapter = adapter_for(make_tiny_model(family, heads, kv_heads, layers=MIXED_LAYERS))
    dense = PruningPlan.keep_all(adapter)
    dense.validate(adapter)
    assert dense.layers[0].kept_heads == list(range(heads)) and len(dense.layers[0].kept_channels) == 96
    mixed_plan(adapter).validate(adapter)


def test_builders_derive_kv_heads_and_turn_empty_into_removal(gqa8):
    plan = PruningPlan.keep_all(gqa8)
    plan.keep_kv_groups(0, [1])
    assert plan.layers[0].kept_heads == [4, 5, 6, 7] and plan.layers[0].kept_kv_heads == [1]
    plan.keep_heads(1, [6, 1, 2, 5])
    assert plan.layers[1].kept_heads == [1, 2, 5, 6] and plan.layers[1].kept_kv_heads == [0, 1]
    plan.keep_heads(2, [])
    plan.keep_channels(2, [])
    assert plan.layers[2].attn_removed and plan.layers[2].mlp_removed and not plan.layers[2].layer_removed
    plan.keep_channels(0, torch.arange(10, 20))  # tensor / numpy integers become plain ints
    assert plan.layers[0].kept_channels == list(range(10, 20)) and json.loads(plan.to_json())
    plan.validate(gqa8)
    with pytest.raises(PrunekitError, match="plan layer 2: attention is removed"):
        plan.keep_heads(2, [0])
    with pytest.raises(PrunekitError, match="plan has no layer 5"):
        plan.remove_layer(5)


def test_removed_blocks_store_empty_lists():
    layer = LayerPlan([0, 1], [0], [3], layer_removed=True)
    assert (layer.attn_removed, layer.mlp_removed) == (True, True)
    assert layer.kept_heads == layer.kept_kv_heads == layer.kept_channels == []
    edited = LayerPlan([0, 1], [0], [3])
    edited.layer_removed = True  # edited by hand: still treated as both blocks removed
    assert not edited.has_attention and not edited.has_mlp
    assert edited.to_dict() == layer.to_dict()


def _bad(index, **fields):
    """Mutate layer ``index`` of a fresh keep-all plan."""
    def mutate(plan):
        for name, value in fields.items():
            setattr(plan.layers[index], name, value)
    return mutate


BAD_PLANS = {
    "head out of range": (_bad(1, kept_heads=[0, 1, 8]), "plan layer 1: kept_heads has index 8 outside 0..7"),
    "negative kv head": (_bad(2, kept_kv_heads=[-1, 0]), "plan layer 2: kept_kv_heads has index -1"),
    "channel out of range": (_bad(0, kept_channels=[0, 96]), "plan layer 0: kept_channels has index 96 outside 0..95"),
    "unsorted heads": (_bad(1, kept_heads=[1, 0, 2, 3], kept_kv_heads=[0]), "plan layer 1: kept_heads must be sorted"),
    "duplicate channels": (_bad(2, kept_channels=[1, 1, 2]), "plan layer 2: kept_channels must be sorted and without"),
    "orphan query head": (_bad(1, kept_heads=[0, 1, 4], kept_kv_heads=[0]), "plan layer 1: query head 4 needs KV"),
    "kv head without queries": (
        _bad(0, kept_heads=[0, 1], kept_kv_heads=[0, 1]), "plan layer 0: KV head 1 is kept but"
    ),
    "uneven groups": (_bad(2, kept_heads=[0, 1, 4]), "plan layer 2: kept KV groups keep different numbers"),
    "no kv head": (_bad(1, kept_heads=[], kept_kv_heads=[]), "plan layer 1: attention keeps no KV head"),
    "no channel": (_bad(0, kept_channels=[]), "plan layer 0: MLP keeps no channel; mark the MLP block removed"),
    "float index": (_bad(2, kept_channels=[0, 1.0]), "plan layer 2: kept_channels must be a list of integers"),
}


@pytest.mark.parametrize("case", BAD_PLANS)
def test_validator_rejects_with_one_line_naming_the_layer(gqa8, case):
    mutate, message = BAD_PLANS[case]
    plan = PruningPlan.keep_all(gqa8)
    mutate(plan)
    with pytest.raises(PrunekitError) as error:
        plan.validate(gqa8)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_validator_rejects_plans_for_another_model(gqa8):
    plan = PruningPlan.keep_all(gqa8)
    plan.layers.pop()
    with pytest.raises(PrunekitError, match="plan has 2 layers but the model has 3"):
        plan.validate(gqa8)
    other = adapter_for(make_tiny_model("llama", heads=4, kv_heads=2, head_dim=8))
    with pytest.raises(PrunekitError, match="different model: num_heads is 4 in the plan but 8 in the model"):
        PruningPlan.keep_all(other).validate(gqa8)


def test_json_round_trip():
    adapter = adapter_for(make_tiny_model("gemma3_text", 4, 2, layers=MIXED_LAYERS))
    plan = mixed_plan(adapter)
    plan.calibration = {"corpus": "sample", "windows": 4, "seqlen": 128}
    plan.metrics = {"ratio_all": 0.25, "ppl": [12.5, None]}
    text = plan.to_json()
    assert PruningPlan.from_json(text) == plan
    assert PruningPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    lines = text.splitlines()
    assert sum(line.lstrip().startswith('{"kept_heads"') for line in lines) == MIXED_LAYERS  # one line per layer
    data = json.loads(text)
    assert data["format"] == "prunekit-plan" and data["dense"]["family"] == "gemma3_text"
    assert data["layers"][2] == {"kept_heads": [], "kept_kv_heads": [], "kept_channels": [],
                                 "attn_removed": True, "mlp_removed": True, "layer_removed": True}
    PruningPlan.from_json(text).validate(adapter)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "not a prunekit plan"),
    (lambda d: d.update(version=99), "plan format version 99 is not supported"),
    (lambda d: d.pop("dense"), "plan field 'dense' is missing"),
    (lambda d: d["layers"][1].pop("kept_heads"), "plan layer 1: missing kept_heads"),
    (lambda d: d["layers"][2].update(extra=1), "plan layer 2: unknown extra"),
    (lambda d: d["layers"][0].update(kept_channels=[0.5]), "kept_channels must be a list of integers"),
    (lambda d: d["layers"][0].update(attn_removed="yes"), "plan layer 0: attn_removed must be true or false"),
])
def test_from_json_rejects_malformed_plans(gqa8, edit, message):
    data = PruningPlan.keep_all(gqa8).to_dict()
    edit(data)
    with pytest.raises(PrunekitError, match=message):
        PruningPlan.from_json(json.dumps(data))
    with pytest.raises(PrunekitError, match="plan is not valid JSON"):
        PruningPlan.from_json("{")


def test_layer_shapes_and_block_removal_builder():
    adapter = adapter_for(make_tiny_model("gemma3_text", 4, 2, layers=MIXED_LAYERS))
    shapes = mixed_plan(adapter).layer_shapes()
    assert [s["source_layer"] for s in shapes] == [0, 1, 3, 4]
    assert [s["layer_type"] for s in shapes] == ["sliding_attention", "full_attention", "full_attention",
                                                 "sliding_attention"]
    assert [(s["num_heads"], s["num_kv_heads"], s["intermediate_size"]) for s in shapes] == [
        (0, 0, 48), (2, 1, 0), (2, 2, 50), (4, 2, 56)]
    plan = PruningPlan.from_block_removals(adapter, attention=[0, 3], mlp=[1], layers=[4], method="blockpruner")
    assert [(lp.has_attention, lp.has_mlp) for lp in plan.layers] == [
        (False, True), (True, False), (True, True), (False, True), (False, False)]
    assert plan.method == "blockpruner" and plan.surviving_layers() == [0, 1, 2, 3]
