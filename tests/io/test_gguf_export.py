"""GGUF export: every kind of removal is written with the right per-layer counts and tensor shapes, read back with
the ``gguf`` package's own reader; the RoPE reorder and Llama 3 frequency factors agree with transformers; bad input
is one line with exit status 2 and nothing written."""

from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

import prunekit
from prunekit.cli_parser import GGUF_TYPES
from prunekit.errors import PrunekitError
from prunekit.io.gguf_export import TENSOR_TYPES, export_gguf, llama3_frequency_factors, rotary_to_interleaved
from tests.conftest import error_lines, make_tiny_model, model_directory, requires_smollm2, run_cli
from tests.structure.common import mixed_plan


def _pruned(kv_heads: int = 2):
    model = make_tiny_model("llama", 4, kv_heads, layers=5)
    plan = mixed_plan(prunekit.adapter_for(model))
    return prunekit.apply_plan(model, plan), plan


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(reader: gguf.GGUFReader) -> dict:
    return {tensor.name: tensor for tensor in reader.tensors}


def test_every_kind_of_removal_reads_back_with_its_per_layer_counts(tmp_path, tiny_tokenizer):
    model, plan = _pruned()
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    summary = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields, tensors = _fields(reader), _tensors(reader)
    surviving = [plan.layers[index] for index in plan.surviving_layers()]
    # Stand-ins that add exactly zero: layer 0 (attention removed) gets one head, layer 1 (MLP removed) one channel.
    heads = [len(layer.kept_heads) or 1 for layer in surviving]
    kv_heads = [len(layer.kept_kv_heads) or 1 for layer in surviving]
    channels = [len(layer.kept_channels) if layer.has_mlp else 1 for layer in surviving]
    assert fields["general.architecture"] == "deci" and summary.architecture == "deci"
    assert fields["deci.block_count"] == 4
    assert fields["deci.attention.head_count"] == heads == [1, 2, 2, 4]
    assert [layer.heads for layer in summary.layers] == [0, 2, 2, 4]  # what the model really has
    assert fields["deci.attention.head_count_kv"] == kv_heads
    assert fields["deci.feed_forward_length"] == channels
    assert fields["deci.attention.key_length"] == 16 and fields["deci.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][:3] == ["<pad>", "<s>", "</s>"]
    assert len(fields["tokenizer.ggml.tokens"]) == 320 and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.merges"]) > 0
    # GGUF shapes are ggml's (columns first): attn_q of a layer is {hidden, heads * head_dim}.
    for index in range(len(surviving)):
        assert list(tensors[f"blk.{index}.attn_q.weight"].shape) == [64, heads[index] * 16]
        assert list(tensors[f"blk.{index}.attn_k.weight"].shape) == [64, kv_heads[index] * 16]
        assert list(tensors[f"blk.{index}.attn_output.weight"].shape) == [heads[index] * 16, 64]
        assert list(tensors[f"blk.{index}.ffn_down.weight"].shape) == [channels[index], 64]
    assert not np.any(tensors["blk.1.ffn_down.weight"].data) and not np.any(tensors["blk.0.attn_output.weight"].data)
    assert summary.stand_in_attention
    torch.testing.assert_close(torch.from_numpy(np.array(tensors["token_embd.weight"].data)),
                               model.model.embed_tokens.weight, rtol=0, atol=0)
    down = model.model.layers[3].mlp.down_proj.weight
    torch.testing.assert_close(torch.from_numpy(np.array(tensors["blk.3.ffn_down.weight"].data)), down,
                               rtol=0, atol=0)
    assert summary.stand_in_mlps == [1]


def test_q_and_k_rows_are_reordered_per_head(tmp_path, tiny_tokenizer):
    model, _ = _pruned()
    export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    tensors = _tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    q = model.model.layers[3].self_attn.q_proj.weight
    written = torch.from_numpy(np.array(tensors["blk.3.attn_q.weight"].data))
    assert not torch.equal(written, q)
    torch.testing.assert_close(written, rotary_to_interleaved(q, 4), rtol=0, atol=0)
    v = model.model.layers[3].self_attn.v_proj.weight
    torch.testing.assert_close(torch.from_numpy(np.array(tensors["blk.3.attn_v.weight"].data)), v, rtol=0, atol=0)


def test_interleaved_rope_on_reordered_rows_equals_rotate_half_rope():
    """What the reorder is for: llama.cpp's pairwise RoPE on the reordered q equals transformers' on the original."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    heads, dim, positions = 3, 8, 5
    weight, hidden = torch.randn(heads * dim, 12), torch.randn(positions, 12)
    angles = torch.arange(positions)[:, None] * (10000.0 ** (-torch.arange(0, dim, 2) / dim))[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q = (hidden @ weight.T).view(positions, heads, dim).transpose(0, 1)[None]
    reference, _ = apply_rotary_pos_emb(q, q, cos[None], sin[None])
    pairs = (hidden @ rotary_to_interleaved(weight, heads).T).view(positions, heads, dim // 2, 2)
    c, s = angles.cos()[:, None, :], angles.sin()[:, None, :]
    rotated = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    back = torch.cat([rotated[..., 0], rotated[..., 1]], -1)  # undo the pairing to compare in HF's layout
    torch.testing.assert_close(back.transpose(0, 1)[None], reference, rtol=1e-5, atol=1e-5)


def test_llama3_frequency_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = make_tiny_model("llama", rope_parameters=rope, max_position_embeddings=512)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    divisors = torch.from_numpy(llama3_frequency_factors(model.config, 16)).double()
    assert divisors.min() == 1.0 and divisors.max() == 8.0  # the test covers all three bands
    torch.testing.assert_close(plain / divisors, scaled.double(), rtol=1e-5, atol=0)


def test_dense_and_uniform_models_are_plain_llama(tmp_path, tiny_tokenizer):
    dense = make_tiny_model("llama", 4, 2, layers=3)
    summary = export_gguf(dense, tiny_tokenizer, tmp_path / "dense.gguf", "f16")
    fields = _fields(gguf.GGUFReader(tmp_path / "dense.gguf"))
    assert summary.architecture == fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 4 and fields["llama.feed_forward_length"] == 96
    tensors = _tensors(gguf.GGUFReader(tmp_path / "dense.gguf"))
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


@pytest.mark.parametrize("kind", ["bf16", "q8_0", "q4_0"])
def test_quantized_types_with_f16_fallback_for_rows_that_do_not_fit(tmp_path, tiny_tokenizer, kind):
    model, _ = _pruned()
    summary = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", kind)
    tensors = _tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    wanted = TENSOR_TYPES[kind][0]
    assert tensors["blk.3.attn_q.weight"].tensor_type == wanted  # rows of hidden = 64 fit every block size
    assert tensors["blk.3.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    down = tensors["blk.3.ffn_down.weight"]  # rows of 56 channels fit no 32-block
    assert down.tensor_type == (wanted if kind == "bf16" else gguf.GGMLQuantizationType.F16)
    assert ("blk.3.ffn_down.weight" in summary.fallback_tensors) == (kind != "bf16")
    restored = gguf.quants.dequantize(tensors["blk.3.attn_v.weight"].data, wanted)
    reference = model.model.layers[3].self_attn.v_proj.weight.detach().numpy()
    assert np.abs(restored - reference).max() < (0.02 if kind == "bf16" else 0.2)


def test_parser_offers_exactly_the_writable_types():
    assert set(GGUF_TYPES) == set(TENSOR_TYPES)


def _cli(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    return code, out, error_lines(err)


def test_cli_exports_a_pruned_checkpoint(capsys, tmp_path, tiny_tokenizer):
    model, _ = _pruned()
    prunekit.save_pruned(model, tiny_tokenizer, tmp_path / "ckpt")
    code, out, _ = _cli(capsys, "export", "--model", tmp_path / "ckpt", "--gguf", tmp_path / "m.gguf",
                        "--gguf-type", "f32", "--no-progress")
    assert code == 0 and "architecture 'deci'" in out and "query heads per layer: 0 2 2 4" in out
    assert "zero one-head attention" in out and "zero one-channel MLP" in out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["deci.block_count"].contents() == 4
    code, _, lines = _cli(capsys, "export", "--model", tmp_path / "ckpt", "--gguf", tmp_path / "m.gguf")
    assert code == 2 and len(lines) == 1 and "already exists" in lines[0] and "--overwrite" in lines[0]
    code, _, _ = _cli(capsys, "export", "--model", tmp_path / "ckpt", "--gguf", tmp_path / "m.gguf", "--overwrite",
                      "--no-progress")
    assert code == 0


@pytest.mark.parametrize("case, pattern", [
    ("qwen3", "export --gguf writes Llama-family models .* not qwen3: .* without its per-head q/k RMSNorms"),
    ("gemma3_text", "not gemma3_text"),
    ("no-tokenizer", "has no tokenizer files"),
    ("wordpiece", "tokenizer type WordPiece is not supported by export --gguf"),
])
def test_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_tokenizer, case, pattern):
    directory = tmp_path / "model"
    if case in ("qwen3", "gemma3_text"):
        model_directory(make_tiny_model(case), tiny_tokenizer, directory)
    elif case == "no-tokenizer":
        make_tiny_model("llama").save_pretrained(directory)
    else:
        model_directory(make_tiny_model("llama"), _wordpiece(), directory)
    code, out, lines = _cli(capsys, "export", "--model", directory, "--gguf", tmp_path / "out.gguf", "--no-progress")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("prunekit: error: "), lines
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


def _wordpiece():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def sentencepiece_style(vocab_size: int = 400, texts: list[str] | None = None):
    """A byte-fallback BPE with a Metaspace pre-tokenizer, the layout of Llama 2 / Mistral tokenizer.json files
    (also used by benchmarks/llamacpp_tokenizers.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prunekit.data.corpora import load_corpus

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(texts or load_corpus("sample", "all").records[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_tokenizers_get_scores_in_merge_order(tmp_path):
    tokenizer = sentencepiece_style()
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    summary = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    fields = _fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert summary.pre_tokenizer == "sentencepiece" and fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"] is True and "tokenizer.ggml.merges" not in fields
    tokens, scores, types = (fields[f"tokenizer.ggml.{key}"] for key in ("tokens", "scores", "token_type"))
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[0] == gguf.TokenType.UNKNOWN
    assert types[tokens.index("<s>")] == gguf.TokenType.CONTROL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    produced = ["".join(merge) if isinstance(merge, list) else merge.replace(" ", "") for merge in merges]
    first = {}
    for rank, token in enumerate(produced):
        first.setdefault(token, rank)
    for token, rank in list(first.items())[:50]:
        assert scores[tokens.index(token)] == -rank  # llama.cpp merges the highest score first = BPE's lowest rank
    assert scores[tokens.index("<s>")] < min(scores[tokens.index(token)] for token in first)


def test_unknown_pre_tokenizer_is_refused():
    from prunekit.io.gguf_vocab import pre_tokenizer_name

    with pytest.raises(PrunekitError, match="matches none that prunekit maps"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}) == "smollm"


def test_uniform_and_gguf_are_exclusive_and_out_belongs_to_uniform(capsys, tmp_path, tiny_model_dir):
    code, _, lines = _cli(capsys, "export", "--model", tiny_model_dir, "--gguf", tmp_path / "a.gguf",
                          "--out", tmp_path / "x")
    assert code == 2 and "--out is for --uniform" in lines[0]
    code, _, lines = _cli(capsys, "export", "--model", tiny_model_dir, "--gguf", tmp_path / "a.gguf", "--uniform")
    assert code == 2 and "not allowed with argument --gguf" in lines[0]
    assert not (tmp_path / "a.gguf").exists()


@requires_smollm2
def test_smollm2_exports_with_its_tokenizer_and_chat_template(tmp_path, smollm2):
    model, tokenizer = smollm2
    summary = export_gguf(model, tokenizer, tmp_path / "smol.gguf", "q8_0")
    fields = _fields(gguf.GGUFReader(tmp_path / "smol.gguf"))
    assert summary.architecture == "llama" and summary.pre_tokenizer == "gpt-2" and not summary.fallback_tensors
    assert fields["llama.block_count"] == 30 and fields["llama.attention.head_count_kv"] == 3
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and len(fields["tokenizer.ggml.merges"]) == 48900
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert "output.weight" not in _tensors(gguf.GGUFReader(tmp_path / "smol.gguf"))  # tied: token_embd serves


def test_mistral_exports_and_says_its_sliding_window_is_not_written(tmp_path, tiny_tokenizer):
    model = make_tiny_model("mistral", 4, 2, layers=2, sliding_window=128)
    summary = export_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    assert summary.architecture == "llama" and "128-token sliding window" in summary.notes[0]


def test_qwen2_biases_are_written_and_reordered_like_their_rows(tmp_path, tiny_tokenizer):
    """llama.cpp's llama / deci graphs add q/k/v biases when present, so Qwen2 exports (checked against llama.cpp
    itself in benchmarks/llamacpp_smollm2.py)."""
    model = make_tiny_model("qwen2", 4, 2, layers=5)
    prunekit.apply_plan(model, mixed_plan(prunekit.adapter_for(model)))
    export_gguf(model, tiny_tokenizer, tmp_path / "q.gguf", "f32")
    tensors = _tensors(gguf.GGUFReader(tmp_path / "q.gguf"))
    attention = model.model.layers[3].self_attn
    written = torch.from_numpy(np.array(tensors["blk.3.attn_q.bias"].data))
    torch.testing.assert_close(written, rotary_to_interleaved(attention.q_proj.bias, 4), rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(np.array(tensors["blk.3.attn_v.bias"].data)), attention.v_proj.bias,
                               rtol=0, atol=0)


def test_pre_tokenizers_are_named_from_their_definition():
    from prunekit.io.gguf_vocab import LLAMA3_PATTERN, QWEN2_PATTERN, pre_tokenizer_name

    def split(pattern):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}}, {"type": "ByteLevel", "use_regex": False}]}}

    assert pre_tokenizer_name(split(LLAMA3_PATTERN)) == "llama-bpe"
    assert pre_tokenizer_name({**split(QWEN2_PATTERN), "normalizer": {"type": "NFC"}}) == "qwen2"
    with pytest.raises(PrunekitError, match="matches none"):
        pre_tokenizer_name(split(LLAMA3_PATTERN.replace("{1,3}", "{1,2}")))
    with pytest.raises(PrunekitError, match="Lowercase normalizer"):
        pre_tokenizer_name({**split(LLAMA3_PATTERN), "normalizer": {"type": "Lowercase"}})
