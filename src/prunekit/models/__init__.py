"""Model loading (bundled GGUF models, local directories, hub ids) and architecture adapters."""

from prunekit.models.adapters import SUPPORTED_MODEL_TYPES, ArchAdapter, adapter_for
from prunekit.models.bundled import BUNDLED, DEFAULT_MODEL
from prunekit.models.loading import is_pruned_checkpoint, load_dense_model, parse_device, parse_dtype

__all__ = [
    "BUNDLED", "DEFAULT_MODEL", "SUPPORTED_MODEL_TYPES", "ArchAdapter", "adapter_for", "is_pruned_checkpoint",
    "load_dense_model", "parse_device", "parse_dtype",
]
