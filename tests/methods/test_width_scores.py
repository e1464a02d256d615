"""Wanda-sp, FLAP and LLM-BIP: their scores and selections against loops written from the definitions."""

import copy
import math

import pytest
import torch
from torch import nn

from prunekit.calibration.statistics import ABS_SUMS, input_statistics
from prunekit.methods import Target, method_info
from prunekit.methods.llmbip import gate_statistics, llmbip_scores
from prunekit.models.adapters import adapter_for
from prunekit.structure.allocation import UnitScores, allocate, layer_counts
from prunekit.structure.masks import MaskedForward, UnitMask
from prunekit.structure.materialize import apply_plan
from prunekit.structure.plan import PruningPlan
from tests.conftest import make_tiny_model
from tests.methods.width_helpers import captured_inputs, lowest, removed, windows

RATIO = 0.3


def _expected_layer(plan, adapter, index, head_scores, channel_scores, counts, unit):
    """Apply the lowest-score rule of one layer to ``plan`` (in place) and return the removed units."""
    g = adapter.heads_per_group
    channels = lowest(channel_scores, counts.channels)
    if unit == "q_head":
        heads = sorted(g * group + h for group in range(adapter.num_kv_heads)
                       for h in lowest(head_scores[g * group:g * (group + 1)], counts.attention_units))
        plan.keep_heads(index, removed(heads, adapter.num_heads))
    else:
        groups = lowest([math.fsum(head_scores[j * g:(j + 1) * g]) for j in range(adapter.num_kv_heads)],
                        counts.attention_units)
        plan.keep_kv_groups(index, removed(groups, adapter.num_kv_heads))
    plan.keep_channels(index, removed(channels, adapter.intermediate_size))


def _wanda_reference(layer, inputs, dh):
    o, down = layer.self_attn.o_proj.weight.detach().double(), layer.mlp.down_proj.weight.detach().double()
    columns = [float(o[:, j].abs().mean() * inputs["o_proj"][:, j].norm()) for j in range(o.shape[1])]
    heads = [math.fsum(columns[h * dh:(h + 1) * dh]) for h in range(o.shape[1] // dh)]
    channels = [float(down[:, k].abs().mean() * inputs["down_proj"][:, k].norm()) for k in range(down.shape[1])]
    return heads, channels


@pytest.mark.parametrize("family,heads,kv_heads", [("llama", 8, 4), ("gemma3_text", 4, 1)])
@pytest.mark.parametrize("sequential", [False, True])
def test_wanda_sp_removes_what_a_loop_from_the_definition_removes(family, heads, kv_heads, sequential):
    model = make_tiny_model(family, heads, kv_heads, layers=3)
    adapter, ids = adapter_for(model), windows()
    plan = method_info("wanda-sp").apply_to(model, Target(RATIO, "linear"), ids, progress=False,
                                            sequential=sequential).plan
    unit = "q_head" if kv_heads == 1 else "kv_group"
    counts = layer_counts(RATIO, adapter, unit)
    reference = PruningPlan.keep_all(adapter)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        # Layer-sequential: layer l's statistics come from the model with layers < l already pruned.
        inputs = captured_inputs(model, adapter, ids, reference if sequential else None)[index]
        head_scores, channel_scores = _wanda_reference(layer, inputs, adapter.head_dim)
        _expected_layer(reference, adapter, index, head_scores, channel_scores, counts, unit)
    assert plan.layers == reference.layers


def _standardized(values):
    return (values - values.mean()) / values.std()


def _flap_reference(layer, inputs, adapter, metric):
    """Raw metric per column (attention squared), z-scored per layer and module; head = mean of its columns."""
    rows = {}
    for name, linear in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
        x, weight = inputs[name], linear.weight.detach().double()
        variance = torch.tensor([float(torch.var(x[:, j])) for j in range(x.shape[1])], dtype=torch.float64)
        if metric == "WIFV":
            values = variance * torch.tensor([float(weight[:, j].pow(2).sum()) for j in range(x.shape[1])])
        elif metric == "IFV":
            values = variance
        else:
            values = torch.tensor([float(weight[:, j].abs().mean() * x[:, j].norm()) for j in range(x.shape[1])])
        rows[name] = _standardized(values.pow(2) if name == "o_proj" else values)
    dh, g = adapter.head_dim, adapter.heads_per_group
    groups = rows["o_proj"].view(adapter.num_kv_heads, g * dh).mean(dim=1)
    return groups, rows["down_proj"]


@pytest.mark.parametrize("metric", ["WIFV", "IFV", "WIFN"])
def test_flap_selects_what_the_definition_selects(metric):
    model = make_tiny_model("llama", 8, 4, layers=3)
    adapter, ids = adapter_for(model), windows()
    inputs = captured_inputs(model, adapter, ids)
    plan = method_info("flap").apply_to(copy.deepcopy(model), Target(RATIO, "linear"), ids, progress=False,
                                        metric=metric).plan
    groups, channels = zip(*(_flap_reference(layer, inputs[index], adapter, metric)
                             for index, layer in enumerate(adapter.decoder_layers(model))), strict=True)
    expected = allocate(PruningPlan.keep_all(adapter), adapter, UnitScores(groups, channels), RATIO, "global",
                        "kv_group", budget=(RATIO, "linear"), standardize=False)
    assert plan.layers == expected.layers
    assert any(len(layer.kept_channels) < 96 for layer in plan.layers)


def test_flap_compensated_layers_give_the_dense_output_on_the_calibration_mean(tmp_path):
    from prunekit.io.checkpoint import load_pruned, save_pruned

    dense = make_tiny_model("llama", 8, 4, layers=3)
    adapter, ids = adapter_for(dense), windows()
    means = [{name: x.mean(dim=0) for name, x in layer.items()} for layer in captured_inputs(dense, adapter, ids)]
    model = copy.deepcopy(dense)
    plan = method_info("flap").apply_to(model, Target(RATIO, "linear"), ids, progress=False).plan
    assert plan.added_biases == ["down_proj", "o_proj"]
    plan.weights_edited = True
    apply_plan(model, plan, edited_weights=True)
    dh = adapter.head_dim
    for index, (pruned_layer, dense_layer) in enumerate(zip(model.model.layers, dense.model.layers, strict=True)):
        kept = {"o_proj": [h * dh + o for h in plan.layers[index].kept_heads for o in range(dh)],
                "down_proj": plan.layers[index].kept_channels}
        for name, pruned, full in (("o_proj", pruned_layer.self_attn.o_proj, dense_layer.self_attn.o_proj),
                                   ("down_proj", pruned_layer.mlp.down_proj, dense_layer.mlp.down_proj)):
            mean = means[index][name].float()
            torch.testing.assert_close(pruned(mean[kept[name]]), full(mean), atol=1e-5, rtol=1e-5)
    assert sum(len(layer.kept_heads) < 8 for layer in plan.layers) and all(len(layer.kept_channels) < 96
                                                                         for layer in plan.layers)
    save_pruned(model, None, tmp_path / "flap")
    reloaded, _ = load_pruned(tmp_path / "flap")
    assert reloaded.model.layers[0].self_attn.o_proj.bias is not None
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


# -- LLM-BIP ---------------------------------------------------------------------------------------------------

def _abs_sums(inputs):
    return inputs["o_proj"].abs().sum(dim=0), inputs["down_proj"].abs().sum(dim=0)


@torch.no_grad()
def _block_change(model, adapter, ids, index, heads=(), channels=()):
    """Σ over tokens and output features of |y − y'|, y the output of layer ``index``, y' the same with the given
    query heads / channels of that layer alone removed (all other layers dense)."""
    outputs = []
    hook = adapter.decoder_layers(model)[index].register_forward_hook(
        lambda _m, _a, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    mask = UnitMask.keep_all(adapter)
    mask.heads[index, list(heads)] = 0.0
    mask.channels[index, list(channels)] = 0.0
    try:
        model(input_ids=ids)
        with MaskedForward(model, adapter, mask):
            model(input_ids=ids)
    finally:
        hook.remove()
    return float((outputs[0].double() - outputs[1].double()).abs().sum())


def test_llmbip_channel_score_is_exactly_the_block_change_of_removing_it():
    model = make_tiny_model("llama", 4, 2, layers=2)
    adapter, ids = adapter_for(model), windows(3, 16)
    inputs = captured_inputs(model, adapter, ids)
    for index, layer in enumerate(model.model.layers):
        _, channel_scores = llmbip_scores(layer, adapter, *_abs_sums(inputs[index]))
        for channel in (0, 17, 95):
            measured = _block_change(model, adapter, ids, index, channels=[channel])
            assert channel_scores[channel].item() == pytest.approx(measured, rel=1e-5)


class _Ones(nn.Module):
    def forward(self, gate):
        return torch.ones_like(gate)


def test_llmbip_head_score_bounds_the_block_change_where_the_bound_is_exact():
    """With a linear, unnormalised MLP (act(gate) = 1, N2 = identity) the spec's Lipschitz step is exact, so every
    head's score is at least the measured change; in a real block it is a heuristic, so only the attention part
    (the 1 in c) is checked there: Σ|Δh| can never exceed Σ_j a_j Σ_o |o[o, j]|."""
    model = make_tiny_model("llama", 4, 2, layers=2)
    adapter, ids = adapter_for(model), windows(3, 16)
    inputs = captured_inputs(model, adapter, ids)
    for index, layer in enumerate(model.model.layers):
        a = inputs[index]["o_proj"].abs().sum(dim=0)
        attention_part = (a * layer.self_attn.o_proj.weight.detach().double().abs().sum(dim=0)).view(-1, 16).sum(dim=1)
        for head in range(adapter.num_heads):
            changed = []
            hook = layer.post_attention_layernorm.register_forward_pre_hook(
                lambda _m, args, store=changed: store.append(args[0]))
            mask = UnitMask.keep_all(adapter)
            mask.heads[index, head] = 0.0
            with torch.no_grad():
                model(input_ids=ids)
                with MaskedForward(model, adapter, mask):
                    model(input_ids=ids)
            hook.remove()
            assert float((changed[0] - changed[1]).double().abs().sum()) <= attention_part[head].item() * (1 + 1e-6)
    for layer in model.model.layers:
        layer.mlp.act_fn, layer.post_attention_layernorm = _Ones(), nn.Identity()
    inputs = captured_inputs(model, adapter, ids)
    for index, layer in enumerate(model.model.layers):
        head_scores, _ = llmbip_scores(layer, adapter, *_abs_sums(inputs[index]))
        for head in range(adapter.num_heads):
            measured = _block_change(model, adapter, ids, index, heads=[head])
            assert 0 < measured <= head_scores[head].item() * (1 + 1e-6)


def test_llmbip_plan_follows_scores_from_the_definition_and_one_pass_statistics_are_exact():
    model = make_tiny_model("llama", 8, 4, layers=3)
    adapter, ids = adapter_for(model), windows()
    inputs = captured_inputs(model, adapter, ids)
    plan = method_info("llmbip").apply_to(model, Target(RATIO, "linear"), ids, progress=False,
                                          allocation="uniform").plan
    reference = PruningPlan.keep_all(adapter)
    counts = layer_counts(RATIO, adapter, "kv_group")
    for index, layer in enumerate(model.model.layers):
        o, up, down = (layer.self_attn.o_proj.weight.detach().double(), layer.mlp.up_proj.weight.detach().double(),
                       layer.mlp.down_proj.weight.detach().double())
        a, b = _abs_sums(inputs[index])
        c = [1 + math.fsum(float(up[k, i].abs() * down[:, k].abs().sum()) for k in range(96)) for i in range(64)]
        columns = [float(a[j]) * math.fsum(float(o[r, j].abs()) * c[r] for r in range(64)) for j in range(128)]
        heads = [math.fsum(columns[h * 16:(h + 1) * 16]) for h in range(8)]
        channels = [float(b[k] * down[:, k].abs().sum()) for k in range(96)]
        _expected_layer(reference, adapter, index, heads, channels, counts, "kv_group")
    assert plan.layers == reference.layers
    layer = model.model.layers[1]
    with input_statistics({"o_proj": layer.self_attn.o_proj}, (ABS_SUMS,)) as statistics, torch.no_grad():
        model(input_ids=ids)
    torch.testing.assert_close(statistics["o_proj"].absolute_sums(), inputs[1]["o_proj"].abs().sum(dim=0))


def test_llmbip_gate_statistics_match_the_analytic_silu_derivative():
    model = make_tiny_model("llama", 4, 2, layers=2)
    adapter, ids = adapter_for(model), windows(3, 16)
    layer = model.model.layers[1]
    outputs = {}
    handles = [layer.mlp.gate_proj.register_forward_hook(lambda _m, _a, out: outputs.setdefault("g", out)),
               layer.mlp.up_proj.register_forward_hook(lambda _m, _a, out: outputs.setdefault("u", out))]
    with gate_statistics(layer, adapter) as statistics, torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    g, u = outputs["g"].reshape(-1, 96).double(), outputs["u"].reshape(-1, 96).double()
    sigmoid = torch.sigmoid(g)
    torch.testing.assert_close(statistics.alpha, (g * sigmoid).abs().mean(dim=0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(statistics.beta, (sigmoid * (1 + g * (1 - sigmoid)) * u).abs().mean(dim=0),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_activation_slopes_match_finite_differences(family):
    from prunekit.methods.llmbip import _activation_and_slope

    act_fn = make_tiny_model(family, 4, 1 if family == "gemma3_text" else 2, layers=1).model.layers[0].mlp.act_fn
    g = torch.linspace(-6, 6, 241, dtype=torch.float64)
    activated, slope = _activation_and_slope(act_fn, g)
    step = 1e-6
    torch.testing.assert_close(activated, act_fn(g))
    torch.testing.assert_close(slope, (act_fn(g + step) - act_fn(g - step)) / (2 * step), rtol=1e-6, atol=1e-7)
