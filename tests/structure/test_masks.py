"""Masked forwards: the masked dense model computes what the materialised plan of the same mask computes."""

import copy

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from prunekit.structure.masks import MaskedForward, UnitMask
from prunekit.structure.materialize import apply_plan
from prunekit.structure.plan import PruningPlan
from tests.conftest import FAMILIES, make_tiny_model

LAYERS = 5
IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _channels(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    channels = (torch.rand(LAYERS, 96, generator=generator) > 0.4).float()
    channels[2] = 0  # a fully masked MLP: the block is removed
    return channels


def _kv_group_mask(adapter) -> UnitMask:
    """Layer 0 keeps group 0, layer 1 group 1, layer 2 no attention at all, layer 3 is bypassed, layer 4 all."""
    groups = torch.ones(LAYERS, adapter.num_kv_heads)
    groups[0, 1:] = 0
    groups[1, 0] = 0
    groups[2] = 0
    layers = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    return UnitMask.from_kv_groups(groups, _channels(1), layers, adapter.heads_per_group)


def _q_head_mask(adapter) -> UnitMask:
    """Every group of a layer keeps the same number of query heads (one, then g - 1), k/v stay."""
    g = adapter.heads_per_group
    heads = torch.ones(LAYERS, adapter.num_heads)
    heads[0] = torch.tensor([1.0 if head % g == 0 else 0.0 for head in range(adapter.num_heads)])
    heads[1] = torch.tensor([0.0 if head % g == 1 else 1.0 for head in range(adapter.num_heads)])
    heads[4] = torch.tensor([1.0 if head % g == g - 1 else 0.0 for head in range(adapter.num_heads)])
    return UnitMask(heads, _channels(2), torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]))


def _hook_count(model) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._forward_hooks_with_kwargs)
               for module in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["kv_group", "q_head"])
def test_masked_dense_model_equals_the_materialised_plan(family, mode):
    model = make_tiny_model(family, heads=4, kv_heads=2, layers=LAYERS)
    adapter = adapter_for(model)
    mask = _kv_group_mask(adapter) if mode == "kv_group" else _q_head_mask(adapter)
    plan = mask.to_plan(adapter)
    assert any(layer.layer_removed for layer in plan.layers)
    assert mode == "q_head" or not plan.layers[2].has_attention
    before = _hook_count(model)
    with torch.no_grad(), MaskedForward(model, adapter, mask):
        masked = model(input_ids=IDS).logits
    assert _hook_count(model) == before  # nothing left registered
    pruned = apply_plan(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=IDS).logits, masked, atol=2e-5, rtol=1e-5)
        assert not torch.allclose(model(input_ids=IDS).logits, masked, atol=1e-3)  # the mask does something


def test_fully_masked_blocks_add_nothing_even_with_output_biases():
    """o_proj and down_proj biases (Llama with attention_bias / mlp_bias) must not leak from a removed block."""
    model = make_tiny_model("llama", heads=4, kv_heads=2, layers=LAYERS, attention_bias=True, mlp_bias=True)
    adapter = adapter_for(model)
    mask = _kv_group_mask(adapter)
    with torch.no_grad(), MaskedForward(model, adapter, mask):
        masked = model(input_ids=IDS).logits
    pruned = apply_plan(copy.deepcopy(model), mask.to_plan(adapter))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=IDS).logits, masked, atol=2e-5, rtol=1e-5)


def test_per_row_masks_equal_one_forward_per_mask():
    model = make_tiny_model("qwen3", heads=4, kv_heads=2, layers=LAYERS)
    adapter = adapter_for(model)
    first, second = _kv_group_mask(adapter), _q_head_mask(adapter)
    batched = UnitMask(torch.stack([first.heads, second.heads]), torch.stack([first.channels, second.channels]),
                       torch.stack([first.layers, second.layers]))
    with torch.no_grad(), MaskedForward(model, adapter, batched) as masked:
        together = model(input_ids=IDS).logits
        separate = []
        for row, single in enumerate((first, second)):
            masked.set_mask(single)
            separate.append(model(input_ids=IDS[row : row + 1]).logits)
        masked.set_mask(None)
        dense = model(input_ids=IDS).logits
    torch.testing.assert_close(together, torch.cat(separate), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(dense, model(input_ids=IDS).logits)  # no mask: exactly the dense model
    assert batched.row(1).to_plan(adapter).to_dict()["layers"] == second.to_plan(adapter).to_dict()["layers"]


def test_hooks_are_removed_on_error_and_bad_masks_are_refused():
    model = make_tiny_model("llama", heads=4, kv_heads=2, layers=LAYERS)
    adapter = adapter_for(model)
    mask = UnitMask.keep_all(adapter, batch=3)
    refusal = pytest.raises(PrunekitError, match="the mask has 3 rows but the forward has 2 sequences")
    with refusal, torch.no_grad(), MaskedForward(model, adapter, mask):
        model(input_ids=IDS)
    assert _hook_count(model) == 0
    with pytest.raises(PrunekitError, match="mask shapes disagree"):
        UnitMask(torch.ones(LAYERS, 4), torch.ones(LAYERS + 1, 96), torch.ones(LAYERS))
    uneven = UnitMask.keep_all(adapter)
    uneven.heads[0, 0] = 0  # group 0 keeps 1 query head, group 1 keeps 2: not a valid plan
    with pytest.raises(PrunekitError, match="different numbers of query heads"):
        uneven.to_plan(adapter)


def test_plan_to_mask_and_back():
    model = make_tiny_model("gemma3_text", heads=4, kv_heads=1, layers=LAYERS)
    adapter = adapter_for(model)
    plan = PruningPlan.keep_all(adapter)
    plan.keep_heads(1, [0, 2])
    plan.keep_channels(3, range(10, 60))
    plan.remove_mlp(0)
    plan.remove_layer(4)
    assert UnitMask.from_plan(plan).to_plan(adapter).to_dict()["layers"] == plan.to_dict()["layers"]
