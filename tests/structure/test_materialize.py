"""Materialisation: sliced models compute what the masked dense model computes, reproducibly, with a KV cache.

Tolerance: the sliced model multiplies smaller matrices than the masked dense one, so fp32 sums are accumulated in
a different order and blocking; the results differ by rounding only (~1e-7 here). atol 1e-5 is far below any real
slicing mistake (a wrong head or channel moves logits by ~1e-2 and more; ``test_reference_detects_wrong_slicing``
checks that).
"""

import copy

import pytest
import torch
from transformers.cache_utils import DummyLayer

from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from prunekit.structure.blocks import RemovedAttention, RemovedMLP
from prunekit.structure.gqa import prune_channels, prune_kv_groups, prune_q_heads
from prunekit.structure.materialize import apply_plan
from prunekit.structure.plan import PruningPlan
from tests.conftest import FAMILIES, TINY_VOCAB, make_tiny_model
from tests.structure.common import MIXED_LAYERS, SHAPE_IDS, SHAPES, masked_reference, mixed_plan

ATOL = 1e-5


def _inputs(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=generator)


def _pruned_and_reference(family, heads, kv_heads, plan_fn=mixed_plan, **overrides):
    model = make_tiny_model(family, heads, kv_heads, layers=MIXED_LAYERS, **overrides)
    adapter = adapter_for(model)
    plan = plan_fn(adapter)
    reference = masked_reference(model, plan, adapter)
    return apply_plan(model, plan), reference, plan, adapter


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES, ids=SHAPE_IDS)
def test_logits_match_masked_reference(family, heads, kv_heads):
    pruned, reference, plan, adapter = _pruned_and_reference(family, heads, kv_heads)
    ids = _inputs()
    with torch.no_grad():
        expected, actual = reference(ids).logits, pruned(ids).logits
        dense = make_tiny_model(family, heads, kv_heads, layers=MIXED_LAYERS)(ids).logits
    assert not torch.allclose(expected, dense, atol=1e-2)  # the plan really changes the function
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    _check_structure(pruned, plan, adapter)


def _check_structure(model, plan, adapter):
    """Shapes, stand-ins, renumbering and config after the mixed plan."""
    layers = adapter.decoder_layers(model)
    config, dh, d = model.config, adapter.head_dim, adapter.hidden_size
    assert len(layers) == config.num_hidden_layers == MIXED_LAYERS - 1
    for position, (source, layer) in enumerate(zip(plan.surviving_layers(), layers, strict=True)):
        layer_plan, attention, mlp = plan.layers[source], adapter.attention(layer), adapter.mlp(layer)
        if layer_plan.has_attention:
            linears = adapter.attention_linears(layer)
            n_q, n_kv = len(layer_plan.kept_heads), len(layer_plan.kept_kv_heads)
            assert linears["q_proj"].weight.shape == (n_q * dh, d)
            assert linears["o_proj"].weight.shape == (d, n_q * dh)
            assert linears["k_proj"].weight.shape == linears["v_proj"].weight.shape == (n_kv * dh, d)
            assert attention.layer_idx == position and attention.num_key_value_groups == n_q // n_kv
        else:
            assert isinstance(attention, RemovedAttention)
            assert all(isinstance(getattr(layer, n), torch.nn.Identity) for n in adapter.spec.attention_norms)
        if layer_plan.has_mlp:
            assert adapter.mlp_linears(layer)["down_proj"].weight.shape == (d, len(layer_plan.kept_channels))
        else:
            assert isinstance(mlp, RemovedMLP)
            assert all(isinstance(getattr(layer, n), torch.nn.Identity) for n in adapter.spec.mlp_norms)
        assert getattr(layer, "layer_idx", position) == position
    if adapter.layer_types:
        assert config.layer_types == [adapter.layer_types[i] for i in plan.surviving_layers()]
    assert config.kv_sharing_modes == ["reuse", None, None, None]
    assert config.prunekit_layers == plan.layer_shapes() and model.prunekit_plan == plan
    assert model.prunekit_dense_config["num_hidden_layers"] == MIXED_LAYERS  # captured before the edits
    assert "prunekit_layers" not in model.prunekit_dense_config
    config.validate()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_biases_are_sliced(family):
    """Llama with attention_bias + mlp_bias (q/k/v/o and gate/up/down biases); Qwen2 (q/k/v biases only)."""
    pruned, reference, plan, adapter = _pruned_and_reference(family, 4, 2, attention_bias=True, mlp_bias=True)
    assert adapter.attention_bias and adapter.o_proj_bias == (family == "llama")
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)
    q_proj = adapter.attention_linears(adapter.decoder_layers(pruned)[1])["q_proj"]
    assert q_proj.bias.shape == (q_proj.weight.shape[0],)


def test_reference_detects_wrong_slicing():
    """The masked reference has power: keeping other heads / channels than planned is caught."""
    model = make_tiny_model("llama", 4, 2, layers=MIXED_LAYERS)
    adapter = adapter_for(model)
    plan = mixed_plan(adapter)
    wrong = plan.copy()
    wrong.keep_kv_groups(1, [0])  # the plan keeps group 1
    off_by_one = plan.copy()
    off_by_one.keep_channels(4, range(39, 95))
    ids = _inputs()
    with torch.no_grad():
        expected = masked_reference(model, plan, adapter)(ids).logits
        for other in (wrong, off_by_one):
            actual = apply_plan(copy.deepcopy(model), other)(ids).logits
            assert not torch.allclose(actual, expected, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_copy_gives_identical_pruned_model(family):
    plan = mixed_plan(adapter_for(make_tiny_model(family, 4, 2, layers=MIXED_LAYERS)))
    first = apply_plan(make_tiny_model(family, 4, 2, layers=MIXED_LAYERS), plan)
    second = apply_plan(make_tiny_model(family, 4, 2, layers=MIXED_LAYERS), PruningPlan.from_json(plan.to_json()))
    one, two = first.state_dict(), second.state_dict()
    assert list(one) == list(two) and all(torch.equal(one[key], two[key]) for key in one)
    assert "model.layers.3.mlp.down_proj.weight" in one and not any(k.startswith("model.layers.4.") for k in one)
    assert first.config.to_dict() == second.config.to_dict()


def _padded_batch():
    ids = _inputs(batch=2, length=7, seed=5)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding: the mask is materialised and must match the cache length
    return ids, mask


def _generate(model, ids, mask, use_cache):
    return model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, use_cache=use_cache,
                          pad_token_id=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("heads,kv_heads", SHAPES, ids=SHAPE_IDS)
def test_generation_with_cache_equals_without(family, heads, kv_heads):
    """Greedy decoding past Gemma3's sliding window (16): cached == uncached == masked dense reference."""
    pruned, reference, _, _ = _pruned_and_reference(family, heads, kv_heads)
    ids, mask = _padded_batch()
    cached = _generate(pruned, ids, mask, use_cache=True)
    assert torch.equal(cached, _generate(pruned, ids, mask, use_cache=False))
    assert torch.equal(cached, _generate(reference, ids, mask, use_cache=False))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_incremental_decoding_positions(family):
    """Feeding tokens one at a time (positions taken from the cache) reproduces the full forward; the cache stores
    nothing for the removed attention of layer 0 and counts the sequence from the first real attention layer."""
    pruned, _, _, _ = _pruned_and_reference(family, 4, 2)
    ids = _inputs(batch=1, length=24)
    with torch.no_grad():
        full = pruned(ids).logits
        out = pruned(ids[:, :10], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(10, 24):
            steps.append(pruned(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)
    assert isinstance(cache.layers[0], DummyLayer) and cache.get_seq_length() == 24
    assert [layer.keys.shape[1] for layer in cache.layers[1:]] == [1, 2, 2]  # KV heads kept per layer


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_scored_plans_from_the_gqa_helpers(family):
    """From random scores: g = 4 shrunk per group in some layers, whole groups elsewhere, channels model-wide."""
    model = make_tiny_model(family, heads=8, kv_heads=2, layers=MIXED_LAYERS, head_dim=8)
    adapter = adapter_for(model)
    generator = torch.Generator().manual_seed(11)
    head_scores = torch.rand(MIXED_LAYERS, 8, generator=generator)
    plan = prune_q_heads(PruningPlan.keep_all(adapter), head_scores, per_group=[2, 0, 1, 0, 2])
    plan = prune_kv_groups(plan, head_scores, per_layer=[0, 1, 0, 1, 0])
    plan = prune_channels(plan, torch.rand(MIXED_LAYERS, 96, generator=generator), total=200)
    reference = masked_reference(model, plan, adapter)
    apply_plan(model, plan)
    groups = [adapter.attention(layer).num_key_value_groups for layer in adapter.decoder_layers(model)]
    assert groups == [2, 4, 3, 4, 2]
    ids, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)
    cached = _generate(model, ids, mask, use_cache=True)
    assert torch.equal(cached, _generate(model, ids, mask, use_cache=False))
    assert torch.equal(cached, _generate(reference, ids, mask, use_cache=False))


DEPTH_PLANS = {
    "layer 0 removed": lambda a: PruningPlan.from_block_removals(a, layers=[0]),
    "layers 0 and 1 attention removed": lambda a: PruningPlan.from_block_removals(a, attention=[0, 1], mlp=[2]),
    "every attention removed": lambda a: PruningPlan.from_block_removals(a, attention=range(5)),
    "all but one layer removed": lambda a: PruningPlan.from_block_removals(a, layers=[0, 1, 3, 4], mlp=[2]),
}


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
@pytest.mark.parametrize("case", DEPTH_PLANS)
def test_depth_plans_generate_consistently(family, case):
    pruned, reference, _, _ = _pruned_and_reference(family, 4, 2, plan_fn=DEPTH_PLANS[case])
    ids, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, reference(ids).logits, atol=ATOL, rtol=0)
    cached = _generate(pruned, ids, mask, use_cache=True)
    assert torch.equal(cached, _generate(pruned, ids, mask, use_cache=False))


def test_invalid_or_repeated_application_is_refused():
    model = make_tiny_model("llama", 4, 2)
    adapter = adapter_for(model)
    plan = PruningPlan.keep_all(adapter)
    plan.layers[1].kept_heads = [0, 1, 2]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match="plan layer 1: kept KV groups keep different numbers"):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched on error
    apply_plan(model, PruningPlan.from_block_removals(adapter, layers=[2]))
    with pytest.raises(PrunekitError, match="already pruned"):
        apply_plan(model, PruningPlan.from_block_removals(adapter_for(make_tiny_model("llama", 4, 2)), layers=[2]))
