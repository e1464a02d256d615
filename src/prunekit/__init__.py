"""prunekit: training-free structured pruning of large language models.

The public API lives in :mod:`prunekit.api` and is loaded on first use (``prunekit.load_model``, ``from prunekit
import prune``), so ``import prunekit`` and ``prunekit --help`` stay fast. Importing prunekit registers its checkpoint
format with transformers (at once if transformers is already imported, otherwise as soon as it is), so
``AutoModelForCausalLM.from_pretrained`` loads pruned checkpoints too.
"""

from __future__ import annotations

import importlib
from typing import Any

from prunekit._register import register_when_transformers_loads

__version__ = "0.1.0"

_API = ("MethodResult", "PruneResult", "PrunekitError", "PruningPlan", "Target", "UnitMask", "adapter_for",
        "apply_plan", "available_methods", "load_model", "load_pruned", "method_info", "perplexity", "prune",
        "save_pruned")
_SUBPACKAGES = ("calibration", "data", "evaluation", "io", "methods", "models", "report", "structure")

__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module("prunekit.api"), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"prunekit.{name}")
    else:
        raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBPACKAGES])


register_when_transformers_loads()
