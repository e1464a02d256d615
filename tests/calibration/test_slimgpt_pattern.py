"""SlimGPT's branch passes, with in-place edits of the output linears, must equal a full forward of the final model."""

import pytest
import torch

from prunekit.calibration import LayerwiseRunner, head_logits
from prunekit.errors import PrunekitError
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
def test_branch_passes_with_output_linear_edits_equal_the_final_model(family):
    model, ids = sliding_model(family), token_windows(4)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, batch_size=3, progress=False) as runner:
        for index, layer in runner.layers():
            attention, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
            stats = runner.collect_branch(index, "attention")
            assert stats.hessian().shape == (64, 64) and stats.tokens == ids.numel()
            zero_columns(attention["o_proj"], slice(0, 16))
            runner.finish_branch(index, "attention")
            stats = runner.collect_branch(index, "mlp")
            assert stats.features == mlp["down_proj"].in_features
            zero_columns(mlp["down_proj"], slice(0, 8))
            calls, handle = count_calls(adapter.mlp(layer))
            runner.finish_branch(index, "mlp")
            handle.remove()
            assert calls == []  # replayed from the kept down_proj inputs, not rerun
        logits = head_logits(model, runner.inputs.tensor())
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=ids, use_cache=False).logits)


def test_run_branch_and_collect_branch_mix():
    model, ids = sliding_model("qwen3"), token_windows(3)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, batch_size=2, progress=False) as runner:
        for index, _layer in runner.layers():
            runner.run_branch(index, "attention")
            runner.collect_branch(index, "mlp")
            runner.finish_branch(index, "mlp")
        logits = head_logits(model, runner.inputs.tensor())
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=ids, use_cache=False).logits)


def test_an_edit_outside_the_output_linear_makes_the_kept_inputs_stale():
    model, ids = sliding_model("qwen2"), token_windows(3)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, progress=False) as runner:
        layer = adapter.decoder_layers(model)[0]
        runner.collect_branch(0, "attention")
        zero_columns(adapter.attention_linears(layer)["q_proj"], slice(0, 8))
        with pytest.raises(PrunekitError, match="stale"):
            runner.finish_branch(0, "attention")


def test_branches_must_come_in_order():
    model, ids = sliding_model("llama"), token_windows(2)
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, progress=False) as runner:
        with pytest.raises(PrunekitError, match="finish its branches in order"):
            runner.collect_branch(0, "mlp")
        with pytest.raises(PrunekitError, match="call collect_branch first"):
            runner.finish_branch(0, "attention")
        with pytest.raises(PrunekitError, match="unknown branch"):
            runner.run_branch(0, "ffn")
        runner.collect_branch(0, "attention")
        runner.finish_branch(0, "attention")
        with pytest.raises(PrunekitError, match="finish its branches in order"):
            runner.advance(0)
