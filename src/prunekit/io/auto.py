"""``AutoModelForCausalLM.from_pretrained(dir)`` for prunekit checkpoints: their config class, registration, arguments.

The loader honours what a stock checkpoint honours where it can (``dtype`` / ``torch_dtype``, a single-device
``device_map``, ``low_cpu_mem_usage``, ``attn_implementation``), accepts the hub arguments that change nothing for a
local directory, and refuses anything else in one line rather than dropping it silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from prunekit.errors import PrunekitError


class PrunedConfig(PretrainedConfig):
    """config.json of a prunekit checkpoint: the dense model's config, wrapped, so nothing loads it by mistake."""

    model_type = "prunekit"

    def __init__(self, base_config: dict | None = None, **kwargs: Any):
        self.base_config = base_config or {}
        super().__init__(**kwargs)


# Passed by transformers' Auto classes or common in user code; harmless for a local prunekit checkpoint.
NEUTRAL = ("config", "trust_remote_code", "local_files_only", "cache_dir", "token", "force_download", "proxies",
           "adapter_kwargs", "_from_auto", "_commit_hash", "use_safetensors", "revision", "subfolder",
           "low_cpu_mem_usage")


class PrunedModelLoader:
    """What ``AutoModelForCausalLM`` resolves a ``prunekit`` config to: it delegates to :func:`load_pruned`."""

    config_class = PrunedConfig

    @classmethod
    def from_pretrained(cls, path: str | Path, *args: Any, **kwargs: Any) -> nn.Module:
        directory = Path(path)
        if args:
            raise PrunekitError("prunekit checkpoints take no positional model arguments after the path")
        if not directory.is_dir():
            raise PrunekitError(f"prunekit checkpoints load from a local directory; {path} is not one")
        dtype = _dtype(directory, kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        device = _device(kwargs.pop("device_map", None))
        attention = kwargs.pop("attn_implementation", None) or _config_overrides(directory, kwargs.get("config"))
        verify = kwargs.pop("verify_weights", True)
        _check_neutral(kwargs)
        from prunekit.io.checkpoint import load_pruned  # checkpoint imports this module: no import at the top

        model, _ = load_pruned(directory, dtype=dtype, device=device, with_tokenizer=False, verify=verify,
                               attn_implementation=attention)
        return model


def _config_overrides(directory: Path, passed: Any) -> str | None:
    """Config keywords transformers folded into the config it passes (``output_attentions=True``, ...) cannot be
    honoured: the wrapped dense config is what the checkpoint is. Returns a requested attention implementation."""
    if passed is None:
        return None
    stored = PrunedConfig.from_pretrained(directory).to_dict()
    changed = sorted(key for key, value in passed.to_dict().items()
                     if key not in ("_name_or_path", "dtype", "torch_dtype") and stored.get(key) != value)
    if changed:
        raise PrunekitError(f"AutoModelForCausalLM.from_pretrained on a prunekit checkpoint cannot honour "
                            f"{changed[0]}={passed.to_dict()[changed[0]]!r}: its config is the pruned model's own")
    requested = getattr(passed, "_attn_implementation_internal", None) or getattr(passed, "_attn_implementation",
                                                                                   None)
    return requested if isinstance(requested, str) and requested != "sdpa" else None


def _dtype(directory: Path, dtype: Any, torch_dtype: Any) -> Any:
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise PrunekitError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one")
    chosen = dtype if dtype is not None else torch_dtype
    if chosen in (None, "auto"):  # the dtype the weights were saved in
        base = json.loads((directory / "config.json").read_text()).get("base_config") or {}
        return base.get("dtype") or base.get("torch_dtype") or "float32"
    return chosen


def _device(device_map: Any) -> torch.device:
    """One device from a ``device_map``; prunekit checkpoints are not split across devices."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise PrunekitError("prunekit checkpoints load onto one device; a device_map spreading the model over "
                                f"{sorted(map(str, devices))} is not supported")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise PrunekitError(f"device_map={device_map!r} names no device") from None


def _check_neutral(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name not in NEUTRAL:
            raise PrunekitError(f"AutoModelForCausalLM.from_pretrained on a prunekit checkpoint cannot honour "
                                f"{name}={value!r}; load it without that argument (prunekit.load_pruned takes "
                                "dtype, device and verify)")
        if name == "use_safetensors" and value is False:
            raise PrunekitError("prunekit checkpoints are safetensors only; use_safetensors=False cannot be honoured")
        if name == "subfolder" and value:
            raise PrunekitError(f"subfolder={value!r} is not supported; pass the checkpoint directory itself")


def register_with_transformers() -> None:
    """Let the Auto classes load prunekit checkpoints (``prunekit._register`` calls it when transformers loads)."""
    try:
        AutoConfig.register(PrunedConfig.model_type, PrunedConfig)
        AutoModelForCausalLM.register(PrunedConfig, PrunedModelLoader)
    except ValueError:  # already registered (module reloaded)
        pass
