"""Onloading from safetensors shards: a model built on the meta device and filled a module at a time computes what
the loaded model computes, every tensor is read once (counted), and a missing or truncated shard is one line."""

from __future__ import annotations

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.models.shards import ShardedCheckpoint, empty_model, offload, onload, onload_rotary
from tests.conftest import make_tiny_model


@pytest.fixture
def sharded(tmp_path):
    model = make_tiny_model("llama", 4, 2, layers=3, tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    return model, tmp_path / "ckpt"


def _onloaded_logits(directory, ids, config):
    checkpoint = ShardedCheckpoint(directory)
    model = empty_model(config)
    assert all(parameter.is_meta for parameter in model.parameters())
    with torch.no_grad():
        hidden = onload(model.model.embed_tokens, "model.embed_tokens.", checkpoint)(ids)
        onload_rotary(model)
        positions = torch.arange(ids.shape[1])[None]
        rotary = model.model.rotary_emb(hidden, positions)
        for index, layer in enumerate(model.model.layers):
            onload(layer, f"model.layers.{index}.", checkpoint)
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            offload(layer)
            assert all(parameter.is_meta for parameter in layer.parameters())
        hidden = onload(model.model.norm, "model.norm.", checkpoint)(hidden)
        logits = onload(model.lm_head, "lm_head.", checkpoint)(hidden)
    return logits, checkpoint


def test_layer_by_layer_onloading_computes_the_loaded_model(sharded):
    model, directory = sharded
    assert len(list(directory.glob("model-*.safetensors"))) > 2  # really sharded
    ids = torch.arange(5, 29)[None]
    logits, checkpoint = _onloaded_logits(directory, ids, model.config)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert set(checkpoint.reads) == set(model.state_dict()) and set(checkpoint.reads.values()) == {1}
    assert checkpoint.bytes_read == sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_a_missing_or_truncated_shard_is_one_line(sharded):
    model, directory = sharded
    shards = sorted(directory.glob("model-*.safetensors"))
    last = shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    checkpoint = ShardedCheckpoint(directory)
    names = [name for name, file in checkpoint.files.items() if file == last.name]
    with pytest.raises(PrunekitError, match=rf"shard .*{last.name} cannot be (opened|read).*truncated or damaged"):
        checkpoint.read(names)
    shards[0].unlink()
    names = [name for name, file in checkpoint.files.items() if file == shards[0].name]
    with pytest.raises(PrunekitError, match=rf"shard .*{shards[0].name} is missing"):
        checkpoint.read(names)


def test_a_directory_without_safetensors_is_refused(tmp_path):
    with pytest.raises(PrunekitError, match="has no model.safetensors.index.json or model.safetensors"):
        ShardedCheckpoint(tmp_path)


def test_bf16_shards_load_into_an_fp32_model(tmp_path):
    model = make_tiny_model("llama", 4, 2, layers=2, tie_word_embeddings=False).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", max_shard_size="40KB")
    reference = model.float()  # the same bf16 values, computed in fp32
    ids = torch.arange(5, 21)[None]
    logits, checkpoint = _onloaded_logits(tmp_path / "bf16", ids, reference.config)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert checkpoint.bytes_read == sum(t.numel() * 2 for t in model.state_dict().values())  # read as bf16
