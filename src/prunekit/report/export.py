"""What ``prunekit export --gguf`` prints: the file, its architecture and per-layer shapes, and any fallbacks."""

from __future__ import annotations

from typing import Any


def gguf_summary(summary: Any) -> str:
    """A few lines describing a written GGUF file (``prunekit.io.gguf_export.GGUFSummary``)."""
    layers = summary.layers
    lines = [f"exported {summary.path}: llama.cpp architecture '{summary.architecture}', {len(layers)} layers, "
             f"{summary.tensor_type} matrices, pre-tokenizer '{summary.pre_tokenizer}', "
             f"{summary.bytes_written / 2**20:.1f} MiB"]
    if summary.architecture == "deci":
        lines.append("  query heads per layer: " + " ".join(str(layer.heads) for layer in layers))
        lines.append("  KV heads per layer:    " + " ".join(str(layer.kv_heads) for layer in layers))
        lines.append("  FFN channels per layer: " + " ".join(str(layer.channels) for layer in layers))
    if summary.stand_in_mlps:
        lines.append(f"  layers {', '.join(map(str, summary.stand_in_mlps))} keep attention without an MLP: written "
                     "with a zero one-channel MLP (llama.cpp's FFN-free layers drop their attention output)")
    if summary.stand_in_attention:
        lines.append("  layer 0 has no attention: written with a zero one-head attention (llama.cpp reads the head "
                     "size from layer 0)")
    if summary.fallback_tensors:
        lines.append(f"  {len(summary.fallback_tensors)} matrices written as f16: their rows do not fit the "
                     f"{summary.tensor_type} block (e.g. {summary.fallback_tensors[0]})")
    lines.extend(f"  note: {note}" for note in summary.notes)
    return "\n".join(lines)
