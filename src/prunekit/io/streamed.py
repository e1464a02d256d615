"""Streamed materialisation: a plan applied to a model whose weights are on disk, written shard by shard.

The onloaded pipeline never holds the whole model. Once a method has produced its plan, each decoder layer is read
from the dense checkpoint's shards, overlaid with the tensors the method edited (``models.onloading.EditStore``),
sliced by its row of the plan (``structure.materialize.materialize_layer``), written as one output shard and freed.
The embeddings, final norm and head are copied the same way. The result is an ordinary prunekit checkpoint whose
weights are split over ``model-NNNNN-of-NNNNN.safetensors`` files listed in ``model.safetensors.index.json``
(``io.checkpoint.load_pruned`` reads both layouts), written atomically: nothing appears at the target until the
last file is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from prunekit._atomic import atomic_directory
from prunekit._hashing import file_sha256
from prunekit.errors import PrunekitError
from prunekit.io.checkpoint import write_checkpoint_files
from prunekit.models.adapters import adapter_for
from prunekit.models.onloading import EditStore, Onloader
from prunekit.models.shards import INDEX_NAME, offload, onload
from prunekit.structure.materialize import add_biases, finish_structure, materialize_layer
from prunekit.structure.plan import PruningPlan

# Called with the staging directory once the weights and config are written; returns what the manifest adds
# (the after-pruning perplexity is measured on the staged checkpoint this way).
BeforeManifest = Callable[[Path], dict[str, Any]]


class ShardWriter:
    """Writes named tensors as numbered safetensors shards and, at the end, their index; keeps each shard's
    SHA-256 for the manifest."""

    def __init__(self, directory: Path, total: int, dtype: torch.dtype):
        self.directory, self.total, self.dtype = directory, total, dtype
        self.weight_map: dict[str, str] = {}
        self.digests: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{len(self.digests) + 1:05d}-of-{self.total:05d}.safetensors"
        if len(self.digests) >= self.total:
            raise PrunekitError(f"more shards written than the {self.total} planned")
        cast = {key: _stored(tensor, self.dtype) for key, tensor in tensors.items()}
        save_file(cast, str(self.directory / name), metadata={"format": "pt"})
        os.chmod(self.directory / name, 0o644)
        self.digests[name] = file_sha256(self.directory / name)
        self.weight_map.update(dict.fromkeys(cast, name))
        self.total_size += sum(tensor.numel() * tensor.element_size() for tensor in cast.values())

    def finish(self) -> dict[str, str]:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.digests


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors in the checkpoint dtype, contiguous, on the CPU."""
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous().cpu()


def save_streamed(onloader: Onloader, plan: PruningPlan, tokenizer: Any, directory: str | Path, *,
                  dtype: torch.dtype, manifest: dict[str, Any] | None = None, overwrite: bool = False,
                  artifacts: dict[str, Any] | None = None, before_manifest: BeforeManifest | None = None,
                  progress: bool = True) -> Path:
    """Materialise ``plan`` on the onloaded (meta-device) model layer by layer into a sharded prunekit checkpoint."""
    model = onloader.model
    adapter = adapter_for(model)
    plan.validate(adapter)
    surviving = plan.surviving_layers()
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        writer = ShardWriter(staging, total=len(surviving) + 2, dtype=dtype)
        _write_modules(writer, onloader, [model.get_input_embeddings()])
        layers = adapter.decoder_layers(model)
        for position, index in enumerate(tqdm(surviving, desc="writing pruned layers", disable=not progress)):
            layer = layers[index]
            _onload_edited(onloader, index, layer, plan)
            materialize_layer(layer, plan.layers[index], adapter, plan.added_biases)
            writer.write({f"model.layers.{position}.{name}": tensor for name, tensor in layer.state_dict().items()})
            offload(layer)  # back to the meta device, keeping the sliced shapes for the config
        _write_modules(writer, onloader, _tail_modules(model, adapter.tied_embeddings))
        finish_structure(model, plan, adapter)
        write_checkpoint_files(staging, model, tokenizer, writer.finish(), manifest, artifacts)
        if before_manifest is not None:
            extra = before_manifest(staging)
            write_checkpoint_files(staging, model, None, writer.digests, {**(manifest or {}), **extra}, None)
    return directory


def _tail_modules(model: nn.Module, tied: bool) -> list[nn.Module]:
    """The final norm and, unless it shares the embedding's matrix, the head."""
    return [model.model.norm] + ([] if tied else [model.get_output_embeddings()])


def _write_modules(writer: ShardWriter, onloader: Onloader, modules: list[nn.Module]) -> None:
    """Copy whole modules (embedding; final norm and head) from the checkpoint into one output shard, as stored
    (cast once, to the checkpoint dtype): an 8B model's embedding is 2 GB in fp32, 1 GB as stored."""
    names = [name for module in modules for name in onloader.checkpoint.names(onloader.prefix(module))]
    writer.write(onloader.checkpoint.read(names))


def _onload_edited(onloader: Onloader, index: int, layer: nn.Module, plan: PruningPlan) -> None:
    """Layer ``index`` from the checkpoint, with the tensors the method edited (or added: FLAP's biases) in place
    of the stored ones."""
    onload(layer, onloader.prefix(layer), onloader.checkpoint, onloader.device)
    edits: EditStore | None = onloader.edits
    if edits is None:
        return
    add_biases(layer, plan.layers[index], onloader.adapter, plan.added_biases)  # zeros, overwritten below
    targets = layer.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in edits.load(index).items():
            if name not in targets:
                raise PrunekitError(f"the method edited tensor {name} of layer {index}, which the dense layer does "
                                    "not have; onloading cannot place it")
            targets[name].copy_(tensor.to(targets[name].dtype))
