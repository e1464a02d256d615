import pytest
import torch
from torch import nn

from prunekit.calibration import LayerwiseRunner, attention_branch, head_logits, layer_forward, mlp_branch
from prunekit.models.adapters import adapter_for
from prunekit.structure.blocks import RemovedAttention, RemovedMLP
from tests.calibration.helpers import sliding_model, token_windows
from tests.conftest import FAMILIES


def contexts(model, batch):
    with LayerwiseRunner(model, adapter_for(model), token_windows(batch), batch_size=batch, progress=False) as runner:
        return [runner.context(index, batch) for index in range(runner.num_layers)]


@pytest.mark.parametrize("family", FAMILIES)
def test_branches_equal_the_layer_forward(family):
    model = sliding_model(family)
    adapter = adapter_for(model)
    hidden = torch.randn(2, 24, 64)
    with torch.no_grad():
        for layer, context in zip(adapter.decoder_layers(model), contexts(model, 2), strict=True):
            expected = layer(hidden, **context.kwargs)
            middle = attention_branch(adapter, layer, hidden, context)
            assert torch.equal(mlp_branch(adapter, layer, middle), expected)
            assert torch.equal(layer_forward(adapter, layer, hidden, context), expected)
            hidden = expected


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_removed_branches_are_skipped(family):
    model = sliding_model(family)
    adapter = adapter_for(model)
    layer = adapter.decoder_layers(model)[1]
    (context,) = contexts(model, 1)[1:2]
    setattr(layer, adapter.spec.attention, RemovedAttention())
    for name in adapter.spec.attention_norms:
        setattr(layer, name, nn.Identity())
    hidden = torch.randn(1, 24, 64)
    with torch.no_grad():
        assert attention_branch(adapter, layer, hidden, context) is hidden
        assert torch.equal(layer_forward(adapter, layer, hidden, context), layer(hidden, **context.kwargs))
        setattr(layer, adapter.spec.mlp, RemovedMLP())
        for name in adapter.spec.mlp_norms:
            setattr(layer, name, nn.Identity())
        assert mlp_branch(adapter, layer, hidden) is hidden
        assert torch.equal(layer(hidden, **context.kwargs), hidden)


def test_blockpruner_prefix_cache_candidate_equals_a_model_without_the_block():
    """Cache the residual entering each branch, then score 'remove attention of layer 1' from layer 1 on."""
    model, ids = sliding_model("gemma3_text"), token_windows(3)
    adapter = adapter_for(model)
    layers = adapter.decoder_layers(model)
    with LayerwiseRunner(model, adapter, ids, batch_size=3, progress=False) as runner, torch.no_grad():
        rows, context = runner.batches()[0], [runner.context(i, 3) for i in range(3)]
        attention_in, mlp_in, hidden = [], [], runner.inputs.read(rows)
        for layer, ctx in zip(layers, context, strict=True):
            attention_in.append(hidden)
            mlp_in.append(attention_branch(adapter, layer, hidden, ctx))
            hidden = mlp_branch(adapter, layer, mlp_in[-1])
        candidate = mlp_branch(adapter, layers[1], attention_in[1])  # layer 1 without its attention
        candidate = layer_forward(adapter, layers[2], candidate, context[2])
        logits = head_logits(model, candidate)
    setattr(layers[1], adapter.spec.attention, RemovedAttention())
    for name in adapter.spec.attention_norms:
        setattr(layers[1], name, nn.Identity())
    with torch.no_grad():
        assert torch.equal(logits, model(input_ids=ids, use_cache=False).logits)
