import pytest
import torch

from prunekit.calibration.statistics import input_statistics
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.methods import prune
from prunekit.methods.base import Target
from prunekit.methods.obs import prepare_hessian
from prunekit.methods.slimgpt import SlimGPTConfig, _greedy_units, dgs_group_sizes, layer_ratios_for
from prunekit.models.adapters import adapter_for
from tests.conftest import make_tiny_model


@pytest.fixture
def windows(tiny_tokenizer):
    return (calibration_windows(tiny_tokenizer, "sample", 64 * 16, seqlen=64, seed=0),
            evaluation_windows(tiny_tokenizer, "sample", seqlen=64, max_tokens=64 * 4))


def _slimgpt(model, tokenizer, calibration, ratio=0.3, **options):
    return prune(model, tokenizer, "slimgpt", ratio, "linear", calibration, progress=False, **options)


@pytest.mark.parametrize("family,heads,kv_heads", [("llama", 4, 2), ("qwen2", 4, 4), ("qwen3", 4, 2)])
def test_realised_ratio_hits_target_and_groups_stay_whole(tiny_tokenizer, windows, family, heads, kv_heads):
    result = _slimgpt(make_tiny_model(family, heads, kv_heads, layers=4), tiny_tokenizer, windows[0])
    assert result.metrics["parameters"]["ratio_layers"] == pytest.approx(0.3, abs=0.01)
    g = heads // kv_heads
    for layer in result.plan.layers:
        assert len(layer.kept_heads) == g * len(layer.kept_kv_heads)
    assert result.plan.layers[0].kept_heads == list(range(heads))  # r_0 = 0: the first layer is untouched
    assert result.plan.seed == 0 and result.plan.calibration["tokens"] == 64 * 16


def test_q_head_mode_for_a_single_kv_head(tiny_tokenizer, windows):
    result = _slimgpt(make_tiny_model("gemma3_text", 4, 1, layers=4), tiny_tokenizer, windows[0], ratio=0.4)
    assert all(layer.kept_kv_heads == [0] for layer in result.plan.layers)
    assert any(len(layer.kept_heads) < 4 for layer in result.plan.layers)
    ids = windows[1].input_ids[:1]
    assert torch.isfinite(result.model(ids).logits).all()


def test_deterministic(tiny_tokenizer, windows):
    first = _slimgpt(make_tiny_model("llama", layers=3), tiny_tokenizer, windows[0])
    second = _slimgpt(make_tiny_model("llama", layers=3), tiny_tokenizer, windows[0])
    assert first.plan.to_dict()["layers"] == second.plan.to_dict()["layers"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_compensation_lowers_layer_output_error(tiny_tokenizer, windows):
    """Same units removed from o_proj of a real layer: compensated weights reconstruct W·X better than slicing."""
    model = make_tiny_model("llama", 4, 4, layers=2)
    o_proj = model.model.layers[1].self_attn.o_proj
    captured = []
    handle = o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, 64)))
    with input_statistics({"o_proj": o_proj}) as statistics, torch.no_grad():
        model(windows[0].input_ids[:4])
    handle.remove()
    inputs = torch.cat(captured)
    settings = SlimGPTConfig()
    weight = o_proj.weight.detach().clone()
    hessian, _, _ = prepare_hessian(statistics["o_proj"].hessian(), weight, 0.01)
    removed, _ = _greedy_units(weight, hessian, 16, 2, settings)
    sliced = o_proj.weight.detach().clone()
    for unit in removed:
        sliced[:, unit * 16 : (unit + 1) * 16] = 0
    target = inputs @ o_proj.weight.detach().T
    compensated_error = ((target - inputs @ weight.T) ** 2).sum()
    sliced_error = ((target - inputs @ sliced.T) ** 2).sum()
    assert compensated_error < 0.9 * sliced_error


def test_slimgpt_beats_uniform_and_uncompensated_on_calibration_fit(tiny_tokenizer, windows):
    """Sanity on a tiny random model: compensation must not make the calibration loss worse."""
    calibration = windows[0]
    with_comp = _slimgpt(make_tiny_model("llama", layers=3), tiny_tokenizer, calibration, ratio=0.4)
    without = _slimgpt(make_tiny_model("llama", layers=3), tiny_tokenizer, calibration, ratio=0.4, compensate=False)
    dense = make_tiny_model("llama", layers=3)
    ids = calibration.input_ids
    with torch.no_grad():
        reference = dense(ids).logits
        error_with = ((with_comp.model(ids).logits - reference) ** 2).mean()
        error_without = ((without.model(ids).logits - reference) ** 2).mean()
    assert error_with < error_without


def test_bf16_model_is_pruned_with_fp32_statistics(tiny_tokenizer, windows):
    model = make_tiny_model("llama", layers=3).to(torch.bfloat16)
    result = _slimgpt(model, tiny_tokenizer, windows[0])
    assert next(result.model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(result.model(windows[1].input_ids[:1]).logits.float()).all()


def test_dgs_released_schedule():
    # the method spec's LLaMA-7B examples (d_ff 11008): 20% -> 845, 166, then 64s (21 steps); 50% -> 54 steps
    assert dgs_group_sizes(round(11008 * 0.2)) == [845, 166] + [64] * 18 + [39]
    fifty = dgs_group_sizes(round(11008 * 0.5))
    assert fifty[:3] == [1024, 992, 240] and len(fifty) == 54 and set(fifty[3:-1]) == {64}
    assert dgs_group_sizes(100) == [64, 36]
    assert sum(dgs_group_sizes(1000)) == 1000


def test_layer_ratios_uniform_and_log(tiny_tokenizer):
    adapter = adapter_for(make_tiny_model("llama", layers=4))
    uniform = layer_ratios_for(adapter, Target(0.3, "linear"), SlimGPTConfig(schedule="uniform"))
    log = layer_ratios_for(adapter, Target(0.3, "linear"), SlimGPTConfig())
    assert uniform == [0.3] * 4 and log[0] == 0.0 and sum(log) / 4 == pytest.approx(0.3)


def test_downdate_option_gives_the_same_pruning(tiny_tokenizer, windows):
    reinvert = _slimgpt(make_tiny_model("llama", layers=3), tiny_tokenizer, windows[0], ratio=0.4)
    downdate = _slimgpt(make_tiny_model("llama", layers=3), tiny_tokenizer, windows[0], ratio=0.4,
                        inverse_update="downdate")
    assert reinvert.plan.to_dict()["layers"] == downdate.plan.to_dict()["layers"]
    for a, b in zip(reinvert.model.parameters(), downdate.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
