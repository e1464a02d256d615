"""Pruned checkpoints: atomic save, strict load, and registration with transformers' Auto classes.

A checkpoint directory holds ``model.safetensors`` (tied tensors stored once), ``config.json`` (model_type
``prunekit``, wrapping the dense model's config), the tokenizer files and ``prunekit.json`` (the plan, the method
settings, the metrics measured at prune time). Loading rebuilds the dense architecture from the wrapped config,
applies the plan (so every tensor has its pruned shape) and loads the weights strictly: a missing, unexpected or
mis-shaped tensor is an error that names it, never a silent re-initialisation. After ``import prunekit``,
``AutoModelForCausalLM.from_pretrained(dir)`` goes through the same path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from prunekit._atomic import atomic_directory
from prunekit.errors import PrunekitError

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "prunekit.json"
FORMAT_VERSION = 1


class PrunedConfig(PretrainedConfig):
    """config.json of a prunekit checkpoint: the dense model's config, wrapped, so nothing loads it by mistake."""

    model_type = "prunekit"

    def __init__(self, base_config: dict | None = None, **kwargs: Any):
        self.base_config = base_config or {}
        super().__init__(**kwargs)


class PrunedModelLoader:
    """What ``AutoModelForCausalLM`` resolves a ``prunekit`` config to: it delegates to :func:`load_pruned`."""

    config_class = PrunedConfig

    @classmethod
    def from_pretrained(cls, path: str | Path, *args: Any, dtype: Any = None, **kwargs: Any) -> nn.Module:
        if dtype in (None, "auto"):  # the dtype the weights were saved in
            dtype = json.loads((Path(path) / "config.json").read_text())["base_config"].get("dtype") or "float32"
        model, _ = load_pruned(path, dtype=dtype, with_tokenizer=False)
        return model


def register_with_transformers() -> None:
    """Let the Auto classes load prunekit checkpoints (called on ``import prunekit``)."""
    try:
        AutoConfig.register(PrunedConfig.model_type, PrunedConfig)
        AutoModelForCausalLM.register(PrunedConfig, PrunedModelLoader)
    except ValueError:  # already registered (module reloaded)
        pass


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    directory: str | Path,
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    artifacts: dict[str, Any] | None = None,
) -> Path:
    """Write a pruned model as a prunekit checkpoint, atomically; returns the directory.

    ``artifacts`` maps extra file names to JSON-serialisable content written beside the weights.
    """
    plan = getattr(model, "prunekit_plan", None)
    dense_config = getattr(model, "prunekit_dense_config", None)
    if plan is None or dense_config is None:
        raise PrunekitError("model carries no pruning plan; prune it (or apply a plan) before saving")
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        save_file(_unique_state_dict(model), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        os.chmod(staging / WEIGHTS_NAME, 0o644)  # safetensors writes it private; a checkpoint is an ordinary file
        PrunedConfig(base_config=dense_config, architectures=dense_config.get("architectures")).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        body = {"format_version": FORMAT_VERSION, "plan": plan.to_dict(), **(manifest or {})}
        (staging / MANIFEST_NAME).write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
        for name, content in (artifacts or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
    return directory


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} in prunekit.json")


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (a tied lm_head is stored as the embedding only)."""
    seen: dict[int, str] = {}
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise PrunekitError(f"{directory} is not a prunekit checkpoint (no {MANIFEST_NAME})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PrunekitError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None


def load_pruned(
    directory: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """Rebuild the exact pruned shapes from a checkpoint and load its weights strictly."""
    from prunekit.models.loading import parse_dtype
    from prunekit.structure.materialize import apply_plan
    from prunekit.structure.plan import PruningPlan

    directory = Path(directory)
    manifest = read_manifest(directory)
    plan = PruningPlan.from_dict(manifest["plan"])
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise PrunekitError(f"{config_path} is missing; the checkpoint is incomplete")
    base = dict(json.loads(config_path.read_text()).get("base_config") or {})
    model_type = base.pop("model_type", None)
    if model_type is None:
        raise PrunekitError(f"{config_path} has no base_config.model_type; not a prunekit checkpoint")
    config = AutoConfig.for_model(model_type, **base)
    model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    apply_plan(model, plan, edited_weights=True)  # every weight, edited or added, comes from the file next
    _load_weights_strictly(model, directory / WEIGHTS_NAME)
    model = model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def _load_weights_strictly(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise PrunekitError(f"{path} is missing; the checkpoint is incomplete")
    expected = _unique_state_dict(model)
    try:
        with safe_open(path, framework="pt") as handle:
            stored = set(handle.keys())
            missing = sorted(set(expected) - stored)
            unexpected = sorted(stored - set(expected))
            if missing:
                raise PrunekitError(f"{path.name} lacks tensor {missing[0]} ({len(missing)} missing in all)")
            if unexpected:
                raise PrunekitError(f"{path.name} has unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
            tensors = {}
            for name, target in expected.items():
                tensor = handle.get_tensor(name)
                if tensor.shape != target.shape:
                    raise PrunekitError(
                        f"{path.name} tensor {name} has shape {tuple(tensor.shape)}, "
                        f"the plan gives {tuple(target.shape)}"
                    )
                tensors[name] = tensor
    except SafetensorError as error:
        raise PrunekitError(f"{path} is damaged or truncated ({error}); re-save the checkpoint") from None
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = parameters.get(name, buffers.get(name))
            target.copy_(tensor.to(target.dtype))
