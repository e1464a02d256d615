"""Pruned checkpoints: atomic save, strict load, and registration with transformers' Auto classes.

A checkpoint directory holds ``model.safetensors`` (tied tensors stored once), ``config.json`` (model_type
``prunekit``, wrapping the dense model's config), the tokenizer files and ``prunekit.json`` (the plan, the method
settings, the metrics measured at prune time, and the SHA-256 of the weights file). Loading checks the digest
(streamed; ``verify=False`` skips it for very large models), rebuilds the dense architecture from the wrapped
config, applies the plan (so every tensor has its pruned shape) and loads the weights strictly: a missing,
unexpected or mis-shaped tensor, or a changed byte, is an error that names it, never a silent re-initialisation.
``AutoModelForCausalLM.from_pretrained(dir)`` goes through the same path (``prunekit.io.auto``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit._atomic import atomic_directory
from prunekit._hashing import file_sha256
from prunekit.errors import PrunekitError
from prunekit.io.auto import PrunedConfig

WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "prunekit.json"
FORMAT_VERSION = 1


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    directory: str | Path,
    manifest: dict[str, Any] | None = None,
    overwrite: bool = False,
    artifacts: dict[str, Any] | None = None,
) -> Path:
    """Write a pruned model as a prunekit checkpoint, atomically; returns the directory.

    ``artifacts`` maps extra file names to content written beside the weights: bytes as they are (plots),
    anything else as JSON.
    """
    plan = getattr(model, "prunekit_plan", None)
    dense_config = getattr(model, "prunekit_dense_config", None)
    if plan is None or dense_config is None:
        raise PrunekitError("model carries no pruning plan; prune it (or apply a plan) before saving")
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        save_file(_unique_state_dict(model), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        os.chmod(staging / WEIGHTS_NAME, 0o644)  # safetensors writes it private; a checkpoint is an ordinary file
        write_checkpoint_files(staging, model, tokenizer, {WEIGHTS_NAME: file_sha256(staging / WEIGHTS_NAME)},
                               manifest, artifacts)
    return directory


def write_checkpoint_files(staging: Path, model: nn.Module, tokenizer: Any, digests: dict[str, str],
                           manifest: dict[str, Any] | None = None, artifacts: dict[str, Any] | None = None) -> None:
    """Everything beside the weights: config (the wrapped dense config), tokenizer, manifest, artifacts.

    ``digests`` maps each weights file (one file, or every shard) to its SHA-256.
    """
    plan, dense_config = model.prunekit_plan, model.prunekit_dense_config
    PrunedConfig(base_config=dense_config, architectures=dense_config.get("architectures")).save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    body = {"format_version": FORMAT_VERSION, "plan": plan.to_dict(), "weights_sha256": digests, **(manifest or {})}
    (staging / MANIFEST_NAME).write_text(json.dumps(body, indent=2, default=_json_default) + "\n")
    for name, content in (artifacts or {}).items():
        if isinstance(content, bytes):
            (staging / name).write_bytes(content)
        else:
            (staging / name).write_text(json.dumps(content, indent=2, default=_json_default) + "\n")


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
    verify: bool = True,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Rebuild the exact pruned shapes from a checkpoint and load its weights strictly (digest checked first)."""
    from prunekit.models.loading import parse_device, parse_dtype
    from prunekit.structure.materialize import apply_plan
    from prunekit.structure.plan import PruningPlan

    directory, device = Path(directory), parse_device(device)
    manifest = read_manifest(directory)
    if not isinstance(manifest.get("plan"), dict):
        raise PrunekitError(f"{directory / MANIFEST_NAME} holds no 'plan'; the checkpoint is incomplete or damaged")
    plan = PruningPlan.from_dict(manifest["plan"])
    base = read_base_config(directory / "config.json")
    if verify:
        _verify_digest(directory, manifest)
    config = AutoConfig.for_model(base.pop("model_type"), **base)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), **extra)
    apply_plan(model, plan, edited_weights=True)  # every weight, edited or added, comes from the file next
    _load_weights_strictly(model, directory)
    model = model.to(device).eval()
    tokenizer = None
    if with_tokenizer:
        tokenizer = read_tokenizer(directory)
    return model, tokenizer


def read_tokenizer(directory: Path) -> Any:
    """The checkpoint's tokenizer, or None when it was saved without one (``save_pruned(model, None, ...)``)."""
    from transformers import AutoTokenizer

    from prunekit.models.loading import has_tokenizer_files

    if not has_tokenizer_files(directory):
        return None

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise PrunekitError(f"the tokenizer files in {directory} cannot be loaded ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None


def read_base_config(path: Path) -> dict[str, Any]:
    """The dense config wrapped in a checkpoint's config.json; one-line errors for a missing or damaged file."""
    if not path.is_file():
        raise PrunekitError(f"{path} is missing; the checkpoint is incomplete")
    try:
        base = dict(json.loads(path.read_text()).get("base_config") or {})
    except (ValueError, AttributeError, TypeError) as error:
        raise PrunekitError(f"{path} is not a prunekit config ({error})") from None
    if base.get("model_type") is None:
        raise PrunekitError(f"{path} has no base_config.model_type; not a prunekit checkpoint")
    return base


def _verify_digest(directory: Path, manifest: dict[str, Any]) -> None:
    """Compare each weights file (one, or every shard) with the digest saved beside it (checkpoints older than the
    digest have none)."""
    for name, expected in (manifest.get("weights_sha256") or {}).items():
        path = directory / name
        if not path.is_file():
            continue  # a missing file is named by the strict load
        if file_sha256(path) != expected:
            raise PrunekitError(f"{path} does not match the SHA-256 in {MANIFEST_NAME}: the weights changed after "
                                "saving; re-save the checkpoint (or skip the check: --no-verify, or verify=False in "
                                "Python)")


def _load_weights_strictly(model: nn.Module, directory: Path) -> None:
    """Copy every tensor of the checkpoint (one file, or shards listed in an index) into ``model``, one tensor at a
    time; missing, unexpected or mis-shaped tensors are one-line errors."""
    from prunekit.models.shards import INDEX_NAME, ShardedCheckpoint

    sharded = (directory / INDEX_NAME).is_file()
    label = INDEX_NAME if sharded else WEIGHTS_NAME
    if not sharded and not (directory / WEIGHTS_NAME).is_file():
        raise PrunekitError(f"{directory / WEIGHTS_NAME} is missing; the checkpoint is incomplete")
    stored = ShardedCheckpoint(directory)  # a truncated or missing shard is its own one-line error
    expected = _unique_state_dict(model)
    missing = sorted(set(expected) - set(stored.files))
    unexpected = sorted(set(stored.files) - set(expected))
    if missing:
        raise PrunekitError(f"{label} lacks tensor {missing[0]} ({len(missing)} missing in all)")
    if unexpected:
        raise PrunekitError(f"{label} has unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for name, target in expected.items():
            tensor = stored.read([name])[name]
            if tensor.shape != target.shape:
                raise PrunekitError(f"{label} tensor {name} has shape {tuple(tensor.shape)}, the plan gives "
                                    f"{tuple(target.shape)}")
            targets[name].copy_(tensor.to(targets[name].dtype))

