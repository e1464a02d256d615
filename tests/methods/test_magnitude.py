"""Magnitude baseline: scores against a loop written from the definition, and the units it removes."""

import math

import pytest

from prunekit.methods import Target, method_info
from prunekit.models.adapters import adapter_for
from prunekit.structure.allocation import layer_counts
from prunekit.structure.params import dense_parameter_counts, plan_parameter_counts
from tests.conftest import make_tiny_model


def _squares(tensor) -> float:
    return math.fsum(float(value) ** 2 for value in tensor.detach().flatten())


def _reference_scores(model, adapter):
    """Per layer: L2 norm of every weight of each KV group (q rows of its heads, k and v rows, o columns), of each
    query head (q rows, o columns), and of each channel (gate and up rows, down column)."""
    dh, g = adapter.head_dim, adapter.heads_per_group
    groups, heads, channels = [], [], []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        head_squares = [_squares(attention.q_proj.weight[h * dh:(h + 1) * dh]) +
                        _squares(attention.o_proj.weight[:, h * dh:(h + 1) * dh]) for h in range(adapter.num_heads)]
        kv_squares = [_squares(attention.k_proj.weight[j * dh:(j + 1) * dh]) +
                      _squares(attention.v_proj.weight[j * dh:(j + 1) * dh]) for j in range(adapter.num_kv_heads)]
        heads.append([math.sqrt(value) for value in head_squares])
        groups.append([math.sqrt(math.fsum(head_squares[j * g:(j + 1) * g]) + kv_squares[j])
                       for j in range(adapter.num_kv_heads)])
        channels.append([math.sqrt(_squares(mlp.gate_proj.weight[c]) + _squares(mlp.up_proj.weight[c]) +
                                   _squares(mlp.down_proj.weight[:, c])) for c in range(adapter.intermediate_size)])
    return groups, heads, channels


def _lowest(scores, count):
    return sorted(sorted(range(len(scores)), key=lambda unit: (scores[unit], unit))[:count])


@pytest.mark.parametrize("family,heads,kv_heads", [("llama", 8, 4), ("qwen2", 4, 2), ("gemma3_text", 4, 1)])
def test_magnitude_removes_the_units_with_the_lowest_l2_norm(family, heads, kv_heads):
    model = make_tiny_model(family, heads, kv_heads, layers=3)
    adapter = adapter_for(model)
    plan = method_info("magnitude").apply_to(model, Target(0.3, "linear"), progress=False).plan
    groups, head_scores, channels = _reference_scores(model, adapter)
    q_head = kv_heads == 1
    counts = layer_counts(0.3, adapter, "q_head" if q_head else "kv_group")
    assert counts.attention_units and counts.channels
    g = adapter.heads_per_group
    for index, layer in enumerate(plan.layers):
        removed_channels = sorted(set(range(96)) - set(layer.kept_channels))
        assert removed_channels == _lowest(channels[index], counts.channels)
        if q_head:
            removed = sorted(set(range(heads)) - set(layer.kept_heads))
            expected = sorted(g * group + h for group in range(kv_heads)
                              for h in _lowest(head_scores[index][g * group:g * (group + 1)], counts.attention_units))
            assert removed == expected and layer.kept_kv_heads == [0]
        else:
            removed = sorted(set(range(kv_heads)) - set(layer.kept_kv_heads))
            assert removed == _lowest(groups[index], counts.attention_units)


def test_magnitude_global_allocation_reaches_the_target():
    model = make_tiny_model("llama", 8, 4, layers=4)
    adapter = adapter_for(model)
    plan = method_info("magnitude").apply_to(model, Target(0.25, "linear"), progress=False,
                                            allocation="global").plan
    removed = dense_parameter_counts(adapter).layer_linear - plan_parameter_counts(plan, adapter).layer_linear
    group_weights = 64 * 16 * (2 * 2 + 2)
    assert abs(removed - 0.25 * dense_parameter_counts(adapter).layer_linear) <= group_weights / 2
    widths = {len(layer.kept_channels) for layer in plan.layers}
    assert len(widths) > 1  # global: layers end up pruned unevenly
