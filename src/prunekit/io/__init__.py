"""Pruned checkpoints: save, strict load, uniform export."""

from prunekit.io.checkpoint import load_pruned, read_manifest, register_with_transformers, save_pruned
from prunekit.io.export import export_uniform, uniform_shape

__all__ = [
    "export_uniform", "load_pruned", "read_manifest", "register_with_transformers", "save_pruned", "uniform_shape",
]
