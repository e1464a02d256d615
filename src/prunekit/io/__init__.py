"""Pruned checkpoints: save, strict load, uniform export."""

from prunekit.io.checkpoint import load_pruned, read_manifest, register_with_transformers, save_pruned

__all__ = ["load_pruned", "read_manifest", "register_with_transformers", "save_pruned"]
