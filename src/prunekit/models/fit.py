"""Whether a model fits in memory whole, layer by layer, or not at all: the choice behind ``--offload auto``.

Sizes come from the safetensors headers (shapes only, no tensor is read), counted in the dtype the model will
compute in. Available memory is ``MemAvailable`` from ``/proc/meminfo`` on the CPU and the free memory of the
GPU for CUDA devices. Whole-model loading is chosen when the weights take at most half of what is available (the
rest is for activations, statistics and the methods' work matrices); otherwise layer-by-layer onloading, which
needs the largest decoder layer plus the embedding, each counted twice for the same reason. Below that the model
cannot be pruned here, and the error says by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from prunekit.errors import PrunekitError
from prunekit.models.shards import ShardedCheckpoint

OFFLOAD_CHOICES = ("auto", "none", "disk")
HEADROOM = 2.0  # weights may take at most 1/HEADROOM of the available memory


@dataclass(frozen=True)
class Footprint:
    """Bytes of a checkpoint's tensors in the compute dtype: all of them, the largest layer, the rest."""

    total: int
    largest_layer: int
    outside_layers: int  # embeddings, final norm, head

    @property
    def onloaded(self) -> int:
        return self.largest_layer + self.outside_layers


def footprint(directory: str | Path, dtype: torch.dtype) -> Footprint:
    """Sizes of the checkpoint in ``directory`` (a safetensors model directory) when held in ``dtype``."""
    checkpoint = ShardedCheckpoint(directory)
    width = torch.empty((), dtype=dtype).element_size()
    per_layer: dict[str, int] = {}
    outside = 0
    by_file: dict[str, list[str]] = {}
    for name, file in checkpoint.files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(checkpoint.directory / file), framework="pt") as handle:
            for name in names:
                size = math.prod(handle.get_slice(name).get_shape()) * width
                layer = _layer_of(name)
                if layer is None:
                    outside += size
                else:
                    per_layer[layer] = per_layer.get(layer, 0) + size
    return Footprint(outside + sum(per_layer.values()), max(per_layer.values(), default=0), outside)


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    if "layers" in parts:
        position = parts.index("layers")
        if position + 1 < len(parts):
            return ".".join(parts[: position + 2])
    return None


def available_bytes(device: torch.device) -> int:
    """Memory this process can still take on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise PrunekitError("cannot read the available memory (/proc/meminfo); choose --offload none or disk")


def choose_offload(directory: str | Path | None, dtype: torch.dtype, device: torch.device,
                   requested: str = "auto", available: int | None = None) -> tuple[str, str]:
    """The offload mode to use and a one-line reason. ``directory`` is None for models that are not a local
    safetensors directory (bundled GGUF, hub ids): they load whole."""
    if requested not in OFFLOAD_CHOICES:
        raise PrunekitError(f"--offload '{requested}' is unknown; use {', '.join(OFFLOAD_CHOICES)}")
    if directory is None:
        if requested == "disk":
            raise PrunekitError("--offload disk reads a local model directory with safetensors weights; save the "
                                "model with save_pretrained first")
        return "none", "the model is not a local safetensors directory"
    if requested == "none":
        return "none", "asked for"
    try:
        sizes = footprint(directory, dtype)
    except PrunekitError:
        if requested == "disk":
            raise
        return "none", "no readable safetensors weights to onload (the loader says what is wrong)"
    free = available_bytes(device) if available is None else available
    label = str(dtype).removeprefix("torch.")
    if sizes.onloaded * HEADROOM > free:
        raise PrunekitError(f"the model cannot fit even layer by layer: its largest layer and embeddings need "
                            f"{_gb(sizes.onloaded)} in {label} (twice that with working memory), {_gb(free)} is "
                            f"available on {device}; free memory or use a smaller --dtype")
    if requested == "disk":
        return "disk", "asked for"
    if sizes.total * HEADROOM <= free:
        return "none", f"weights need {_gb(sizes.total)} in {label}, {_gb(free)} available on {device}"
    return "disk", (f"weights need {_gb(sizes.total)} in {label}, more than half of the {_gb(free)} available on "
                    f"{device}; layers are read from disk one at a time")


def _gb(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
