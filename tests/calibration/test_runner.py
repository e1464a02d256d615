import pytest
import torch

from prunekit.calibration import LayerwiseRunner, head_logits
from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.models.adapters import adapter_for
from tests.calibration.helpers import SEQLEN, sliding_model, token_windows
from tests.conftest import FAMILIES


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def layerwise_logits(model, ids, **options):
    options.setdefault("progress", False)
    with LayerwiseRunner(model, adapter_for(model), ids, **options) as runner:
        for index, _ in runner.layers():
            runner.advance(index)
        with torch.no_grad():
            return head_logits(model, runner.inputs.tensor())


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_reproduces_the_full_forward(family):
    model, ids = sliding_model(family), token_windows()
    # batch size 2 over 5 windows: two batch sizes, so per-batch-size masks are exercised too
    assert torch.equal(layerwise_logits(model, ids, batch_size=2), full_logits(model, ids))


def test_gemma3_layers_get_their_own_masks_and_rotary_tables():
    model = sliding_model("gemma3_text")
    assert model.config.sliding_window < SEQLEN
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    with LayerwiseRunner(model, adapter_for(model), token_windows(), batch_size=5, progress=False) as runner:
        sliding, full = runner.context(0, 5), runner.context(1, 5)
    assert (sliding.layer_type, full.layer_type) == ("sliding_attention", "full_attention")
    mask = sliding.kwargs["attention_mask"]
    assert mask is not None and not mask[0, 0, SEQLEN - 1, 0] and mask[0, 0, SEQLEN - 1, SEQLEN - 1]
    assert full.kwargs["attention_mask"] is None or full.kwargs["attention_mask"][0, 0, SEQLEN - 1, 0]
    local_cos, global_cos = sliding.kwargs["position_embeddings"][0], full.kwargs["position_embeddings"][0]
    assert not torch.equal(local_cos, global_cos)  # rope_local_base_freq differs from rope_theta


def test_embedding_scale_is_captured():
    model = sliding_model("gemma3_text")
    ids = token_windows(2)
    with LayerwiseRunner(model, adapter_for(model), ids, progress=False) as runner:
        captured = runner.inputs.tensor()
    with torch.no_grad():
        assert torch.equal(captured, model.get_input_embeddings()(ids))  # includes the sqrt(d) scaling
        assert not torch.equal(captured, torch.nn.functional.embedding(ids, model.get_input_embeddings().weight))


def test_bf16_model_matches_its_full_forward():
    model = sliding_model("qwen3").to(torch.bfloat16)
    ids = token_windows(3)
    assert torch.equal(layerwise_logits(model, ids, batch_size=2), full_logits(model, ids))


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offload_gives_identical_results_and_cleans_up(offload, tmp_path):
    model, ids = sliding_model("llama"), token_windows()
    reference = layerwise_logits(model, ids, batch_size=2)
    seen_files = []
    runner = LayerwiseRunner(model, adapter_for(model), ids, batch_size=2, offload=offload, offload_dir=tmp_path,
                             progress=False)
    for index, _layer in runner.layers():
        runner.collect_branch(index, "attention")
        seen_files.append(len(list(tmp_path.iterdir())))
        runner.finish_branch(index, "attention")
        runner.run_branch(index, "mlp")
    with torch.no_grad():
        logits = head_logits(model, runner.inputs.tensor())
    runner.close()
    assert torch.equal(logits, reference)
    assert seen_files == ([2] * 3 if offload == "disk" else [0] * 3)  # inputs + kept o_proj inputs
    assert list(tmp_path.iterdir()) == []


def test_token_windows_are_accepted():
    model, ids = sliding_model("llama"), token_windows(2)
    windows = TokenWindows(ids, "test", "calibration", SEQLEN, "none", "sequential", None, ids.numel())
    with LayerwiseRunner(model, adapter_for(model), windows, progress=False) as runner:
        assert (runner.num_windows, runner.seqlen, runner.num_layers) == (2, SEQLEN, 3)


def test_the_walk_is_enforced():
    model = sliding_model("llama")
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, token_windows(2), progress=False) as runner:
        with pytest.raises(PrunekitError, match="not of layer 1"):
            runner.advance(1)
        with pytest.raises(PrunekitError, match="was not advanced"):
            for _ in runner.layers():
                pass
        with pytest.raises(PrunekitError, match="received no inputs"):
            runner.collect(0, adapter.mlp_linears(adapter.decoder_layers(model)[0]), stop_after="attention")
        with pytest.raises(PrunekitError, match="unknown stop point"):
            runner.collect(0, {}, stop_after="everything")
    with pytest.raises(PrunekitError, match="unknown offload mode"):
        LayerwiseRunner(model, adapter, token_windows(2), offload="gpu")


def test_on_batch_sees_layer_inputs_and_outputs():
    model, ids = sliding_model("mistral"), token_windows(3)
    adapter = adapter_for(model)
    with torch.no_grad():
        hidden = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    pairs = []
    with LayerwiseRunner(model, adapter, ids, batch_size=2, progress=False) as runner:
        runner.advance(0, on_batch=lambda rows, x, y: pairs.append((rows, x.clone(), y.clone())))
    assert [rows for rows, _, _ in pairs] == [slice(0, 2), slice(2, 3)]
    assert torch.equal(torch.cat([x for _, x, _ in pairs]), hidden[0])
    assert torch.equal(torch.cat([y for _, _, y in pairs]), hidden[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_replaying_kept_attention_inputs_reproduces_the_full_forward(family):
    """Wanda-sp's pass: whole-layer statistics with the o_proj inputs kept, then the outputs with the attention
    output replayed from them (bit-identical while nothing changed), and a changed o_proj is used by the replay."""
    model, ids = sliding_model(family), token_windows()
    adapter = adapter_for(model)
    with LayerwiseRunner(model, adapter, ids, batch_size=2, progress=False) as runner:
        for index, layer in runner.layers():
            o_proj = adapter.attention_linears(layer)["o_proj"]
            statistics = runner.collect_keeping_attention(index, {"o_proj": o_proj})
            assert statistics["o_proj"].tokens == ids.numel()
            runner.finish_branch(index, "attention")
            runner.run_branch(index, "mlp")
        with torch.no_grad():
            assert torch.equal(head_logits(model, runner.inputs.tensor()), full_logits(model, ids))
    with (LayerwiseRunner(model, adapter, ids, batch_size=2, progress=False) as runner,
          pytest.raises(PrunekitError, match="no kept inputs for the attention branch of layer 0")):
        runner.finish_branch(0, "attention")
