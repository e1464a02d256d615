"""Dense models: bundled names, local Hugging Face directories, GGUF files and hub ids.

Pruned checkpoints are read by ``prunekit.io.checkpoint``; ``prunekit.load_model`` (``prunekit.api``) takes both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import family_spec
from prunekit.models.bundled import BUNDLED, ensure_converted

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PrunekitError(f"unknown dtype '{dtype}'; use one of: float32, bfloat16, float16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise PrunekitError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError(f"device '{device}' requested but no CUDA GPU is available; use --device cpu")
    return parsed


def load_dense_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, object]:
    """Load a dense causal LM and its tokenizer, in eval mode, on ``device`` in ``dtype``.

    ``name_or_path`` is a bundled name (``prunekit models`` lists them), a local Hugging Face directory, a
    ``.gguf`` file, or a hub id (only where the network allows).
    """
    torch_dtype, torch_device = parse_dtype(dtype), parse_device(device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in BUNDLED:
        model, tokenizer = _load_hf_directory(ensure_converted(name), torch_dtype, trust_remote_code)
    elif path.is_dir():
        if is_pruned_checkpoint(path):
            raise PrunekitError(f"{path} is a pruned prunekit checkpoint; load it with prunekit.load_model or "
                                "prunekit.load_pruned")
        if not (path / "config.json").is_file():
            raise PrunekitError(f"directory {path} has no config.json; it is not a Hugging Face model directory")
        model, tokenizer = _load_hf_directory(path, torch_dtype, trust_remote_code)
    elif path.is_file():
        if path.suffix != ".gguf":
            raise PrunekitError(f"{path} is a file but not a .gguf model; pass a model directory or a GGUF file")
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif _looks_like_path(name):
        raise PrunekitError(f"model path {name} does not exist")
    elif "/" in name:
        model, tokenizer = _load_hub_id(name, torch_dtype, trust_remote_code)
    else:
        raise PrunekitError(
            f"unknown model '{name}'; bundled models: {', '.join(BUNDLED)}; or pass a local directory, "
            "a .gguf file or a hub id like org/name"
        )
    family_spec(model.config.model_type)
    return model.to(torch_device).eval(), tokenizer


def is_pruned_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``prunekit.save_pruned`` (it holds a prunekit.json)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / "prunekit.json").is_file()


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1


def _check_supported_config(directory: Path, trust_remote_code: bool) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as error:  # not JSON, or JSON that is no model config
        raise PrunekitError(f"{directory / 'config.json'} cannot be read as a model config: {_first_line(error)}") \
            from None
    family_spec(config.model_type)


def _load_hf_directory(directory: Path, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_supported_config(directory, trust_remote_code)
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
        tokenizer = None  # a directory without tokenizer files is a model without one; commands that need it say so
        if has_tokenizer_files(directory):
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as error:  # no or damaged weights, no tokenizer files
        raise PrunekitError(f"cannot load the model in {directory}: {_first_line(error)}") from None
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer_files(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (ValueError, KeyError, OSError) as error:
        raise PrunekitError(f"could not read GGUF file {path}: {str(error).splitlines()[0]}") from None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """A quick probe, so an offline machine gets its answer at once instead of after minutes of retries."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub_id(hub_id: str, dtype: torch.dtype, trust_remote_code: bool):
    """Load from the local Hugging Face cache, or download where the network allows."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False") or not _hub_reachable()
    for local_only in (True, False):
        if not local_only and offline:
            break
        kwargs = {"local_files_only": local_only, "trust_remote_code": trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(hub_id, **kwargs)
            family_spec(config.model_type)
            model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype, **kwargs)
            return model, AutoTokenizer.from_pretrained(hub_id, **kwargs)
        except OSError:
            continue
    raise PrunekitError(
        f"cannot load '{hub_id}' from the Hugging Face hub (offline or not found) and it is not in the local cache; "
        "download it where the network allows and pass the local directory instead"
    )
