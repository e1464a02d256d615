import pytest
import torch

from prunekit.calibration.statistics import input_statistics
from prunekit.data import calibration_windows, evaluation_windows
from prunekit.methods import prune
from prunekit.methods.base import Target
from prunekit.methods.obs import prepare_hessian
from prunekit.methods.slimgpt import (
    SlimGPTConfig,
    _greedy_channels,
    _greedy_units,
    dgs_group_sizes,
    layer_ratios_for,
)
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


def test_q_head_mode_removes_the_same_number_of_query_heads_from_every_group(tiny_tokenizer, windows):
    result = _slimgpt(make_tiny_model("llama", 8, 2, layers=4), tiny_tokenizer, windows[0], ratio=0.5,
                      attention_unit="q_head")
    pruned = [layer for layer in result.plan.layers if len(layer.kept_heads) < 8]
    assert pruned  # some layers lose query heads
    for layer in result.plan.layers:
        assert layer.kept_kv_heads == [0, 1]  # k/v stay in q-head mode
        per_group = [sum(head // 4 == group for head in layer.kept_heads) for group in (0, 1)]
        assert per_group[0] == per_group[1] >= 1
    mqa = _slimgpt(make_tiny_model("gemma3_text", 4, 1, layers=4), tiny_tokenizer, windows[0], ratio=0.4)
    assert all(layer.kept_kv_heads == [0] for layer in mqa.plan.layers)  # auto picks q-head mode for one KV head
    assert any(len(layer.kept_heads) < 4 for layer in mqa.plan.layers)
    assert torch.isfinite(mqa.model(windows[1].input_ids[:1]).logits).all()


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


def test_compensation_fits_the_dense_logits_better_than_plain_removal(tiny_tokenizer, windows):
    """Same schedule, units chosen the same way: with OBS compensation the pruned model stays closer to the dense."""
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


def test_uniform_schedule_prunes_every_layer_alike_and_log_increase_does_not(tiny_tokenizer, windows):
    uniform = _slimgpt(make_tiny_model("llama", 4, 4, layers=4), tiny_tokenizer, windows[0], ratio=0.3,
                       schedule="uniform")
    widths = {(len(layer.kept_heads), len(layer.kept_channels)) for layer in uniform.plan.layers}
    assert len(widths) == 1 and widths != {(4, 96)}
    log = _slimgpt(make_tiny_model("llama", 4, 4, layers=4), tiny_tokenizer, windows[0], ratio=0.3)
    kept = [len(layer.kept_channels) + 3 * 16 * len(layer.kept_heads) for layer in log.plan.layers]
    assert kept[0] == 96 + 3 * 16 * 4 and kept == sorted(kept, reverse=True)  # r_0 = 0, then deeper is pruned more


def test_bf16_model_gets_hessians_accumulated_in_fp32(tiny_tokenizer, windows, monkeypatch):
    """The Hessian handed to the solver equals 2 XᵀX / N computed in float64 from the bf16 inputs (to fp32
    accuracy: a bf16 accumulation would be off by about 1e-2)."""
    import prunekit.methods.slimgpt as slimgpt_module

    model = make_tiny_model("llama", layers=3).to(torch.bfloat16)
    o_proj = model.model.layers[0].self_attn.o_proj
    recorded, hessians = [], []
    handle = o_proj.register_forward_pre_hook(lambda module, args: recorded.append(args[0].detach().clone()))
    original = slimgpt_module.prepare_hessian
    monkeypatch.setattr(slimgpt_module, "prepare_hessian",
                        lambda hessian, *args, **kwargs: hessians.append(hessian.clone())
                        or original(hessian, *args, **kwargs))
    result = _slimgpt(model, tiny_tokenizer, windows[0], schedule="uniform", batch_size=4)
    handle.remove()
    batches = windows[0].num_windows // 4  # collect_branch's pass; finish_branch replays the same inputs after it
    inputs = torch.cat([batch.reshape(-1, batch.shape[-1]) for batch in recorded[:batches]]).double()
    assert inputs.shape[0] == windows[0].num_tokens and recorded[0].dtype == torch.bfloat16
    assert hessians[0].dtype == torch.float32
    torch.testing.assert_close(hessians[0].double(), 2 * inputs.T @ inputs / inputs.shape[0], rtol=1e-5, atol=1e-6)
    assert next(result.model.parameters()).dtype == torch.bfloat16


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


# -- reference checks: the greedy loops against a slow, direct implementation (float64) ----------------------------

def _obs_problem(columns=16, out=6, tokens=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(columns, tokens, generator=generator, dtype=torch.float64)
    inputs[3] += 0.7 * inputs[9]  # correlated inputs, so compensation matters and the ranking changes over steps
    hessian = inputs @ inputs.T + 1e-3 * torch.eye(columns, dtype=torch.float64)
    return torch.randn(out, columns, generator=generator, dtype=torch.float64), hessian


def _refit(weight, hessian, removed):
    """The optimal weights with the ``removed`` columns gone: least squares on the kept ones, W H_:K (H_KK)⁻¹."""
    kept = [c for c in range(weight.shape[1]) if c not in removed]
    refit = torch.zeros_like(weight)
    refit[:, kept] = weight @ hessian[:, kept] @ torch.linalg.inv(hessian[kept][:, kept])
    return refit


def _decoupled_inverse(hessian, removed):
    decoupled = hessian.clone()
    decoupled[removed, :], decoupled[:, removed] = 0, 0
    decoupled[removed, removed] = 1.0
    return torch.linalg.inv(decoupled)


def _reference_units(weight, hessian, width, total, exact, group_size=None, quota=None):
    removed_units = []
    for _ in range(total):
        gone = [c for u in removed_units for c in range(u * width, (u + 1) * width)]
        current, hessian_inverse = _refit(weight, hessian, gone), _decoupled_inverse(hessian, gone)
        errors = []
        for unit in range(weight.shape[1] // width):
            columns = list(range(unit * width, (unit + 1) * width))
            full = group_size and sum(u // group_size == unit // group_size for u in removed_units) >= quota
            if unit in removed_units or full:
                errors.append(float("inf"))
                continue
            factor = torch.linalg.cholesky(hessian_inverse[columns][:, columns])
            if exact:
                errors.append(float((torch.linalg.solve_triangular(factor, current[:, columns].T, upper=False)
                                     ** 2).sum()))
            else:
                errors.append(sum(float((current[:, c] ** 2).sum()) / float(factor[j, j]) ** 2
                                  for j, c in enumerate(columns)))
        removed_units.append(min(range(len(errors)), key=lambda u: (errors[u], u)))
    gone = [c for u in removed_units for c in range(u * width, (u + 1) * width)]
    return removed_units, _refit(weight, hessian, gone)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("mode", ["kv_group", "q_head"])
def test_head_loop_equals_a_slow_reference(exact, mode):
    """Batched Greedy Pruning over several steps: same units in the same order, same compensated weights."""
    weight, hessian = _obs_problem(seed=1 if exact else 2)
    if mode == "kv_group":  # 4 units of width 4, remove 3
        width, total, grouping = 4, 3, {}
    else:  # 8 query heads of width 2 in 2 KV groups of 4; 2 heads from each group
        width, total, grouping = 2, 4, {"group_of": lambda unit: unit // 4, "quota": 2}
    work = weight.clone()
    removed, _ = _greedy_units(work, hessian.clone(), width, total, SlimGPTConfig(exact_ranking=exact), **grouping)
    expected, refit = _reference_units(weight, hessian, width, total, exact, 4 if grouping else None,
                                       grouping.get("quota"))
    assert removed == expected
    assert torch.allclose(work, refit, atol=1e-9)
    if grouping:
        assert sorted(unit // 4 for unit in removed) == [0, 0, 1, 1]


def test_mlp_loop_with_dynamic_group_size_equals_a_slow_reference():
    weight, hessian = _obs_problem(columns=24, seed=3)
    config = SlimGPTConfig(dgs_max=3, dgs_min=3)
    sizes = dgs_group_sizes(10, 3, 3)
    assert sizes == [3, 3, 3, 1]
    work = weight.clone()
    removed, _ = _greedy_channels(work, hessian.clone(), 10, config)
    expected: list[int] = []
    for size in sizes:
        current, hessian_inverse = _refit(weight, hessian, expected), _decoupled_inverse(hessian, expected)
        scores = (current**2).sum(dim=0) / torch.diagonal(hessian_inverse)
        order = sorted((c for c in range(24) if c not in expected), key=lambda c: (float(scores[c]), c))
        expected += order[:size]
    assert removed == expected
    assert torch.allclose(work, _refit(weight, hessian, expected), atol=1e-9)
