"""LLM-Pruner's Taylor importance: group scores against autograd on the full gradient, micro-batching, memory guard."""

import copy
import math

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError
from prunekit.methods import Target, method_info
from prunekit.methods import taylor as taylor_module
from prunekit.models.adapters import adapter_for
from prunekit.structure.allocation import layer_counts
from tests.conftest import make_tiny_model
from tests.methods.width_helpers import lowest, removed, windows


def _full_gradient_scores(model, ids, variant):
    """One backward of the mean loss over every window at once, then loops over each group's members."""
    model = copy.deepcopy(model)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    adapter = adapter_for(model)
    dh, g = adapter.head_dim, adapter.heads_per_group

    def member(weight, index, dim):
        part = (weight.detach() * weight.grad).double()
        values = part[index] if dim == 1 else part[:, index]
        return float(values.abs().sum()) if variant == "element" else abs(float(values.sum()))

    def rows(weight, unit, dim):
        return math.fsum(member(weight, r, dim) for r in range(unit * dh, (unit + 1) * dh))

    groups, channels = [], []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups.append([math.fsum(rows(attention.q_proj.weight, h, 1) + rows(attention.o_proj.weight, h, 0)
                                 for h in range(j * g, (j + 1) * g))
                       + rows(attention.k_proj.weight, j, 1) + rows(attention.v_proj.weight, j, 1)
                       for j in range(adapter.num_kv_heads)])
        channels.append([member(mlp.gate_proj.weight, k, 1) + member(mlp.up_proj.weight, k, 1)
                         + member(mlp.down_proj.weight, k, 0) for k in range(adapter.intermediate_size)])
    return groups, channels


@pytest.mark.parametrize("variant", ["element", "vector"])
def test_taylor_group_scores_equal_autograd_on_the_full_gradient(variant):
    model = make_tiny_model("llama", 8, 4, layers=2)
    adapter, ids = adapter_for(model), windows(5, 16)
    groups, channels = _full_gradient_scores(model, ids, variant)
    with taylor_module.layer_gradients(model, adapter, checkpointing=False):
        taylor_module.accumulate_gradients(model, ids, micro_batch=2, progress=False)  # 2 + 2 + 1 windows
        scores = [taylor_module.taylor_scores(layer, adapter, variant) for layer in model.model.layers]
    assert all(parameter.grad is None for parameter in model.parameters())
    assert all(parameter.requires_grad for parameter in model.parameters())  # restored
    for (heads, channel_scores), group_row, channel_row in zip(scores, groups, channels, strict=True):
        torch.testing.assert_close(heads.view(4, 2).sum(dim=1), torch.tensor(group_row, dtype=torch.float64),
                                   rtol=2e-4, atol=1e-9)
        torch.testing.assert_close(channel_scores, torch.tensor(channel_row, dtype=torch.float64), rtol=2e-4,
                                   atol=1e-9)


def test_taylor_removes_the_lowest_groups_and_channels_with_or_without_checkpointing():
    model = make_tiny_model("llama", 8, 4, layers=2)
    adapter, ids = adapter_for(model), windows(4, 16)
    groups, channels = _full_gradient_scores(model, ids, "element")
    counts = layer_counts(0.3, adapter)
    for checkpointing in (False, True):
        plan = method_info("taylor").apply_to(copy.deepcopy(model), Target(0.3, "linear"), ids, progress=False,
                                              allocation="uniform", gradient_checkpointing=checkpointing).plan
        for index, layer in enumerate(plan.layers):
            assert removed(layer.kept_kv_heads, 4) == lowest(groups[index], counts.attention_units)
            assert removed(layer.kept_channels, 96) == lowest(channels[index], counts.channels)


def test_taylor_refuses_a_micro_batch_that_does_not_fit(monkeypatch):
    monkeypatch.setattr(taylor_module, "available_bytes", lambda device: 1 << 10)
    model = make_tiny_model("llama", 4, 2, layers=3)
    with pytest.raises(PrunekitError, match=r"taylor needs about .* GiB .* lower micro_batch or set "
                                            r"gradient_checkpointing=true"):
        prunekit.prune(model, None, "taylor", 0.2, calibration=windows(4, 16), progress=False)
    assert all(parameter.grad is None for parameter in model.parameters())
