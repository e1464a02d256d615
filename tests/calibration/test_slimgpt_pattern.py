"""SlimGPT's three passes per layer, with in-place 'pruning', must equal a full forward of the final model."""

import pytest
import torch

from prunekit.calibration import LayerwiseRunner, head_logits
from prunekit.models.adapters import adapter_for
from tests.calibration.helpers import sliding_model, token_windows


def zero_columns(linear, columns):
    """Stand-in for a pruning step: an in-place edit that depends on the statistics being present."""
    with torch.no_grad():
        linear.weight[:, columns] = 0


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_slimgpt_passes_reuse_the_attention_residual(family):
    model, ids = sliding_model(family), token_windows(4)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, batch_size=3, progress=False) as runner:
        for index, layer in runner.layers():
            attention, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
            stats = runner.collect(index, {"o_proj": attention["o_proj"]}, stop_after="attention")  # (a)
            assert stats["o_proj"].hessian().shape == (64, 64) and stats["o_proj"].tokens == ids.numel()
            zero_columns(attention["o_proj"], slice(0, 16))
            stats = runner.collect(index, {"down_proj": mlp["down_proj"]}, keep_residual=True)  # (b)
            zero_columns(mlp["down_proj"], slice(0, 8))
            calls, handle = count_calls(adapter.attention(layer))
            runner.advance(index)  # (c)
            handle.remove()
            assert calls == []  # only the MLP branch ran
        logits = head_logits(model, runner.inputs.tensor())
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=ids, use_cache=False).logits)


def test_a_residual_made_stale_by_an_attention_edit_is_not_reused():
    model, ids = sliding_model("qwen2"), token_windows(3)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, progress=False) as runner:
        for index, layer in runner.layers():
            runner.collect(index, {"down_proj": adapter.mlp_linears(layer)["down_proj"]}, keep_residual=True)
            zero_columns(adapter.attention_linears(layer)["o_proj"], slice(16, 32))  # after the residual was kept
            calls, handle = count_calls(adapter.attention(layer))
            runner.advance(index)
            handle.remove()
            assert calls == [1]  # recomputed
        logits = head_logits(model, runner.inputs.tensor())
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=ids, use_cache=False).logits)
