"""Weights read from a checkpoint's safetensors shards a module at a time, into a model built without weights.

The foundation of layer-by-layer onloading (pruning models larger than memory): ``empty_model`` builds the
architecture on the meta device (no memory for weights); ``onload`` reads exactly one module's tensors from the
shards that hold them (safetensors reads only those byte ranges) into real storage on a device; ``offload`` returns
the module to the meta device, freeing it. ``ShardedCheckpoint`` counts every tensor read and the bytes read, so a
pipeline can show that it read each layer once. A missing or truncated shard is a one-line error naming the file.

Rotary tables are buffers computed at construction, not stored: ``onload_rotary`` builds them on the device.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from prunekit.errors import PrunekitError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ShardedCheckpoint:
    """Which shard holds which tensor, tensors read on demand, and a count of what was read."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = self._weight_map()
        self.bytes_read = 0
        self.reads: Counter[str] = Counter()

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as error:
                raise PrunekitError(f"{index} is not a safetensors index ({type(error).__name__}); the checkpoint "
                                    "is damaged") from None
        single = self.directory / SINGLE_NAME
        if single.is_file():
            return dict.fromkeys(self._open(SINGLE_NAME, "cpu").keys(), SINGLE_NAME)
        raise PrunekitError(f"{self.directory} has no {INDEX_NAME} or {SINGLE_NAME}; onloading reads safetensors "
                            "checkpoints only")

    def names(self, prefix: str) -> list[str]:
        """Tensor names under ``prefix`` (e.g. ``model.layers.3.``), in file order."""
        return [name for name in self.files if name.startswith(prefix)]

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The named tensors, read from their shards onto ``device``."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise PrunekitError(f"tensor {name} is in no shard of {self.directory}; the checkpoint is incomplete")
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, members in by_file.items():
            handle = self._open(file, device)
            for name in members:
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as error:
                    raise PrunekitError(f"shard {self.directory / file} cannot be read at tensor {name} "
                                        f"({_first_line(error)}); it is truncated or damaged") from None
                self.bytes_read += tensor.numel() * tensor.element_size()
                self.reads[name] += 1
                tensors[name] = tensor
        return tensors

    def identity(self) -> str:
        """Tensor names, shard files, sizes and modification times, as JSON: what identifies this copy of the
        weights without reading them (a resumable search checks it before continuing)."""
        files = sorted(set(self.files.values()))
        stats = {file: [(self.directory / file).stat().st_size, (self.directory / file).stat().st_mtime_ns]
                 for file in files if (self.directory / file).is_file()}
        return json.dumps({"weight_map": self.files, "files": stats}, sort_keys=True)

    def read_summary(self) -> dict[str, int]:
        """What was read so far: bytes, and the fewest and most reads of any tensor (0 if one was never read)."""
        counts = [self.reads.get(name, 0) for name in self.files]
        return {"bytes_read": self.bytes_read, "tensors": len(counts), "fewest_reads": min(counts, default=0),
                "most_reads": max(counts, default=0)}

    def _open(self, file: str, device: torch.device | str) -> Any:
        path = self.directory / file
        if not path.is_file():
            raise PrunekitError(f"shard {path} is missing; the checkpoint is incomplete (copy it again)")
        try:
            return safe_open(str(path), framework="pt", device=str(device))
        except (SafetensorError, OSError) as error:
            raise PrunekitError(f"shard {path} cannot be opened ({_first_line(error)}); it is truncated or "
                                "damaged") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def empty_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The architecture of ``config`` with every parameter on the meta device (no memory), in eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def onload(module: nn.Module, prefix: str, checkpoint: ShardedCheckpoint,
           device: torch.device | str = "cpu") -> nn.Module:
    """Give ``module`` (whose tensors are stored under ``prefix``) real storage on ``device`` and load it strictly."""
    names = checkpoint.names(prefix)
    # Ordinary tensors even when called under inference mode (pgprune's passes): the calibration runner checks
    # parameter versions, which inference tensors do not have.
    with torch.inference_mode(False):
        tensors = checkpoint.read(names, device)
        state = {name[len(prefix):]: tensor for name, tensor in tensors.items()}
        module.to_empty(device=device)  # load_state_dict then copies (and casts) into this storage
        missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        name = prefix + (missing or unexpected)[0]
        raise PrunekitError(f"tensor {name} is {'missing from' if missing else 'unexpected in'} "
                            f"{checkpoint.directory}; the checkpoint does not match its config")
    return module


def offload(module: nn.Module) -> None:
    """Free the module's storage (back to the meta device)."""
    module.to("meta")


def onload_rotary(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Rebuild the rotary-embedding tables (computed, not stored) on ``device``."""
    rotary = model.model.rotary_emb
    with torch.device(device):  # its constructor computes the tables on the current default device
        model.model.rotary_emb = type(rotary)(config=model.config)


class MemorySource(ShardedCheckpoint):
    """The same interface over a state dict held in CPU memory (``--offload cpu``): each module's tensors are
    copied to the compute device when it runs and freed there afterwards, so a GPU holds one layer at a time."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.directory = Path("<memory>")
        self.tensors = {name: tensor.detach() for name, tensor in state.items()}
        self.files = dict.fromkeys(self.tensors, "memory")
        self.bytes_read = 0
        self.reads = Counter()

    def read(self, names: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        tensors = {}
        for name in names:
            if name not in self.tensors:
                raise PrunekitError(f"tensor {name} is not in the model's weights")
            tensor = self.tensors[name]
            self.bytes_read += tensor.numel() * tensor.element_size()
            self.reads[name] += 1
            tensors[name] = tensor.to(device, copy=True)  # a copy: the method may edit it in place
        return tensors

    def identity(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in self.tensors.items():
            digest.update(name.encode())
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
