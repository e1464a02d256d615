"""Export a Llama-family model (Llama, Mistral, Qwen2), dense or pruned by prunekit, as one GGUF file for llama.cpp.

Architecture: a model whose layers all keep both blocks with one shape is written as llama.cpp's ``llama``; any
other (per-layer head / KV-head / FFN counts, removed attention or MLP blocks) as ``deci``, the architecture
llama.cpp added for NVIDIA's pruned Nemotron models: its head count, KV-head count and FFN length are per-layer
arrays, a layer with 0 heads has no attention and a layer with FFN length 0 has no MLP. Whole removed layers are
simply absent.

Two departures, forced by llama.cpp (the version llama-cpp-python 0.3.36 vendors), each exact:

- its ``deci`` graph skips the rest of a layer whose FFN length is 0 without adding that layer's attention output
  to the residual stream (right for Nemotron's layers that drop both, wrong for a layer that keeps its attention).
  A layer that keeps attention but lost its MLP is written with a one-channel MLP whose down projection is zero:
  it adds exactly 0.0 to the stream and costs 3 x hidden weights plus a norm.
- it reads the head size only when layer 0 has attention heads. When layer 0's attention was removed, layer 0 is
  written with a one-head attention whose output projection is zero (adds exactly 0.0; costs 4 x head_dim x hidden
  weights, a norm and one head's KV cache in that layer).

Weights: q / k projections (and Qwen2's q / k biases) are permuted per head from Hugging Face's rotate-half RoPE
layout to the interleaved pairs llama.cpp's ``llama`` / ``deci`` RoPE expects; norms and biases stay f32; matrices
are written in the asked type. Quantized types (Q8_0, Q4_0, ... as the ``gguf`` package writes them) need each
row's length to be a multiple of the type's block; a pruned FFN rarely is, so such matrices fall back to f16 and the
summary counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from prunekit._atomic import atomic_file
from prunekit.errors import PrunekitError
from prunekit.io.gguf_vocab import add_tokenizer
from prunekit.structure.blocks import RemovedAttention, RemovedMLP

LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # Qwen2 is a Llama graph plus q/k/v biases, which llama.cpp applies
# Why the other supported families do not map onto llama.cpp's llama / deci graphs.
NOT_LLAMA = {"qwen3": "its per-head q/k RMSNorms", "gemma3_text": "its q/k norms, four norms per layer, scaled "
             "embeddings and alternating sliding-window layers"}
Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
TENSOR_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}


@dataclass(frozen=True)
class LayerCounts:
    """One exported layer: query heads, KV heads, FFN channels (0 = that block is absent)."""

    heads: int
    kv_heads: int
    channels: int


@dataclass
class GGUFSummary:
    """What was written, for the command's report."""

    path: Path
    architecture: str
    tensor_type: str
    layers: list[LayerCounts]
    pre_tokenizer: str
    fallback_tensors: list[str] = field(default_factory=list)
    stand_in_mlps: list[int] = field(default_factory=list)
    stand_in_attention: bool = False
    bytes_written: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StandIns:
    """Zero-contribution blocks llama.cpp needs (see the module note): MLPs for these layers, attention in layer 0."""

    mlps: list[int]
    attention_in_layer_0: bool

    def written(self, layers: list[LayerCounts]) -> list[LayerCounts]:
        """The counts as written into the file."""
        counts = [LayerCounts(layer.heads, layer.kv_heads, 1 if index in self.mlps else layer.channels)
                  for index, layer in enumerate(layers)]
        if self.attention_in_layer_0:
            counts[0] = LayerCounts(1, 1, counts[0].channels)
        return counts


def export_gguf(model: nn.Module, tokenizer: Any, path: str | Path, tensor_type: str = "f16",
                overwrite: bool = False, progress: bool = False) -> GGUFSummary:
    """Write ``model`` (a Llama-family model as loaded or pruned by prunekit) and its tokenizer to ``path``."""
    if tensor_type not in TENSOR_TYPES:
        raise PrunekitError(f"unknown GGUF tensor type '{tensor_type}'; choose one of {', '.join(TENSOR_TYPES)}")
    config = model.config
    check_exportable(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = layer_counts(model, head_dim)
    architecture = "llama" if len(set(layers)) == 1 and layers[0].heads and layers[0].channels else "deci"
    stand_ins = StandIns([index for index, layer in enumerate(layers) if layer.heads and not layer.channels],
                         layers[0].heads == 0)
    path = check_target(Path(path), overwrite)
    summary = GGUFSummary(path, architecture, tensor_type, layers, "", stand_in_mlps=stand_ins.mlps,
                          stand_in_attention=stand_ins.attention_in_layer_0)
    with atomic_file(path) as staging:
        writer = gguf.GGUFWriter(staging, architecture)
        summary.pre_tokenizer, note = add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
        summary.notes.extend([note] if note else [])
        _add_hyperparameters(writer, model, layers, head_dim, architecture, stand_ins, tensor_type)
        for name, array in _tensors(model, layers, head_dim, architecture, stand_ins):
            _add_tensor(writer, name, array, tensor_type, summary)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    summary.bytes_written = path.stat().st_size
    summary.notes.extend(_sliding_window_note(config))
    return summary


def check_target(path: Path, overwrite: bool) -> Path:
    """Refuse an existing output without ``overwrite``, or a directory, in one line."""
    if path.exists() and not overwrite:
        raise PrunekitError(f"--gguf {path} already exists; choose another path or pass --overwrite")
    if path.is_dir():
        raise PrunekitError(f"--gguf {path} is a directory; give a file path ending in .gguf")
    return path


def _sliding_window_note(config: Any) -> list[str]:
    """What llama.cpp's own converter does for Mistral too: its llama graph has no sliding window."""
    window = getattr(config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or []) or config.model_type == "mistral"
    if not (sliding and window and window < config.max_position_embeddings):
        return []
    return [f"llama.cpp attends to the whole context; this model's {window}-token sliding window is not written, so "
            "outputs differ on inputs longer than the window"]


def check_exportable(config: Any) -> None:
    """One-line refusal for a family, or a RoPE variant, that prunekit does not map onto llama.cpp."""
    family = getattr(config, "model_type", None)
    if family not in LLAMA_FAMILY:
        why = (f": llama.cpp's per-layer architecture (deci) is a Llama graph, without {NOT_LLAMA[family]}"
               if family in NOT_LLAMA else "")
        raise PrunekitError(f"export --gguf writes Llama-family models ({', '.join(LLAMA_FAMILY)}), not {family}{why}")
    _rope(config)  # refuses a RoPE scaling llama.cpp is not told about


def layer_counts(model: nn.Module, head_dim: int) -> list[LayerCounts]:
    """Per surviving decoder layer, read from the modules themselves (so dense and pruned models alike)."""
    counts = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        heads = kv_heads = channels = 0
        if not isinstance(attention, RemovedAttention):
            heads = attention.q_proj.out_features // head_dim
            kv_heads = attention.k_proj.out_features // head_dim
        if not isinstance(mlp, RemovedMLP):
            channels = mlp.gate_proj.out_features
        counts.append(LayerCounts(heads, kv_heads, channels))
    return counts


def _add_hyperparameters(writer: gguf.GGUFWriter, model: nn.Module, layers: list[LayerCounts], head_dim: int,
                         architecture: str, stand_ins: StandIns, tensor_type: str) -> None:
    config = model.config
    layers = stand_ins.written(layers)
    channels = [layer.channels for layer in layers]
    writer.add_name(getattr(config, "_name_or_path", None) or "prunekit-export")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(len(layers))
    per_layer = architecture == "deci"
    writer.add_feed_forward_length(channels if per_layer else channels[0])
    writer.add_head_count([layer.heads for layer in layers] if per_layer else layers[0].heads)
    writer.add_head_count_kv([layer.kv_heads for layer in layers] if per_layer else layers[0].kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(model.get_input_embeddings().weight.shape[0])
    writer.add_file_type(TENSOR_TYPES[tensor_type][1])
    rope = _rope(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["kind"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _rope(config: Any) -> dict[str, Any]:
    """RoPE settings as llama.cpp takes them: default, linear scaling, or Llama 3's frequency factors."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = parameters.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise PrunekitError(f"RoPE scaling '{kind}' is not written by export --gguf (default, linear, llama3 are)")
    return {"theta": float(theta), "kind": kind, "factor": parameters.get("factor"), "parameters": parameters}


def llama3_frequency_factors(config: Any, head_dim: int) -> np.ndarray:
    """Per rotary pair, the divisor Llama 3's scaling applies to its frequency (llama.cpp's ``rope_freqs``)."""
    rope = _rope(config)
    parameters, theta = rope["parameters"], rope["theta"]
    factor, low, high = parameters["factor"], parameters["low_freq_factor"], parameters["high_freq_factor"]
    original = parameters["original_max_position_embeddings"]
    frequencies = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / frequencies
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, blended))
    return divisors.astype(np.float32)


def rotary_to_interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half order (x_i pairs with x_{i+d/2}) to adjacent pairs (2i, 2i+1)."""
    rows, columns = weight.shape[0], weight.shape[1:]
    halves = weight.reshape(heads, 2, rows // heads // 2, *columns)
    return halves.transpose(1, 2).reshape(rows, *columns)


def _tensors(model: nn.Module, layers: list[LayerCounts], head_dim: int, architecture: str, stand_ins: StandIns):
    """(GGUF name, float32 array) for every tensor, tied embeddings once."""
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.DECI if architecture == "deci" else gguf.MODEL_ARCH.LLAMA,
                               len(layers))
    seen: set[int] = set()
    for hf_name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            continue  # the output head tied to the embedding: llama.cpp reuses token_embd when output is absent
        seen.add(tensor.data_ptr())
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PrunekitError(f"tensor {hf_name} has no GGUF name in llama.cpp's {architecture} architecture")
        weight = tensor.detach().float().cpu()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            layer = layers[int(hf_name.split(".")[2])]
            weight = rotary_to_interleaved(weight, layer.heads if "q_proj" in hf_name else layer.kv_heads)
        yield name, weight.numpy()
    for index in stand_ins.mlps:
        yield from _stand_in_mlp(names, index, model.config.hidden_size)
    if stand_ins.attention_in_layer_0:
        yield from _stand_in_attention(names, model.config.hidden_size, head_dim)
    if _rope(model.config)["kind"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_frequency_factors(
            model.config, head_dim)


def _stand_in_mlp(names: gguf.TensorNameMap, index: int, hidden: int):
    """A one-channel MLP that adds exactly zero (see the module note on llama.cpp's FFN-free layers)."""
    prefix = f"model.layers.{index}."
    yield names.get_name(prefix + "post_attention_layernorm.weight", (".weight",)), np.ones(hidden, np.float32)
    yield names.get_name(prefix + "mlp.gate_proj.weight", (".weight",)), np.zeros((1, hidden), np.float32)
    yield names.get_name(prefix + "mlp.up_proj.weight", (".weight",)), np.zeros((1, hidden), np.float32)
    yield names.get_name(prefix + "mlp.down_proj.weight", (".weight",)), np.zeros((hidden, 1), np.float32)


def _stand_in_attention(names: gguf.TensorNameMap, hidden: int, head_dim: int):
    """A one-head attention that adds exactly zero: its output projection is zero."""
    prefix = "model.layers.0."
    yield names.get_name(prefix + "input_layernorm.weight", (".weight",)), np.ones(hidden, np.float32)
    for projection in ("q_proj", "k_proj", "v_proj"):
        yield names.get_name(f"{prefix}self_attn.{projection}.weight", (".weight",)), np.zeros((head_dim, hidden),
                                                                                               np.float32)
    yield names.get_name(prefix + "self_attn.o_proj.weight", (".weight",)), np.zeros((hidden, head_dim), np.float32)


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, tensor_type: str,
                summary: GGUFSummary) -> None:
    """Add one tensor in the asked type; vectors stay f32, matrices whose rows do not fit the block fall back."""
    kind = TENSOR_TYPES[tensor_type][0]
    if array.ndim < 2 or kind == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        return
    if kind not in (Q.F16, Q.BF16):
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if array.shape[-1] % block:
            summary.fallback_tensors.append(name)
            kind = Q.F16
    if kind == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
        return
    writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
