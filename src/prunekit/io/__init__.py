"""Pruned checkpoints: save, strict load, the Auto-class loader, uniform export, plan files."""

from prunekit.io.checkpoint import load_pruned, read_manifest, save_pruned
from prunekit.io.export import export_uniform, uniform_shape
from prunekit.io.plans import read_plan

__all__ = ["export_uniform", "load_pruned", "read_manifest", "read_plan", "save_pruned",
           "uniform_shape"]
