"""prunekit's public Python API, in one place (``import prunekit`` exposes every name here).

    model, tokenizer = prunekit.load_model("smollm2-135m")
    result = prunekit.prune(model, tokenizer, "slimgpt", ratio=0.2, calibration=windows)
    result.save("out/")
    pruned, tokenizer = prunekit.load_model("out/")       # or prunekit.load_pruned("out/")
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from prunekit import data
from prunekit.errors import PrunekitError
from prunekit.evaluation import perplexity
from prunekit.io.checkpoint import load_pruned, save_pruned
from prunekit.methods import MethodResult, PruneResult, Target, available_methods, method_info, prune
from prunekit.models import adapter_for, is_pruned_checkpoint, load_dense_model, parse_device, parse_dtype
from prunekit.structure import PruningPlan, UnitMask, apply_plan


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    verify: bool = True,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    ``name_or_path`` is a bundled name (``prunekit models`` lists them), a local Hugging Face directory, a
    prunekit checkpoint directory, a ``.gguf`` file, or a hub id (only where the network allows). ``verify``:
    check a pruned checkpoint's weights against their SHA-256 (skip it for very large models).
    """
    if is_pruned_checkpoint(name_or_path):
        return load_pruned(name_or_path, dtype=parse_dtype(dtype), device=parse_device(device), verify=verify)
    return load_dense_model(name_or_path, dtype, device, trust_remote_code)


__all__ = [
    "MethodResult",
    "PruneResult",
    "PrunekitError",
    "PruningPlan",
    "Target",
    "UnitMask",
    "adapter_for",
    "apply_plan",
    "available_methods",
    "data",
    "load_model",
    "load_pruned",
    "method_info",
    "perplexity",
    "prune",
    "save_pruned",
]
