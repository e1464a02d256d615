"""Layer-by-layer onloading: a model whose weights stay on disk until the pipeline reaches them.

:class:`Onloader` is attached to a model built on the meta device (``models.shards.empty_model``). The layer-wise
pipeline (``calibration.runner.LayerwiseRunner``) asks it for the embeddings while it captures the first layer's
inputs, and for one decoder layer at a time while it walks the decoder; each is read from the checkpoint's
safetensors shards when asked for and returned to the meta device when the pipeline moves on. Peak memory is then
one layer, the embeddings (only while capturing) and the calibration activations.

Methods that edit weights in place (SlimGPT's compensation) change a layer while it is onloaded; on release, every
tensor whose storage or in-place version changed is kept in an :class:`EditStore` (safetensors files on disk, one
per layer), from which the streamed materialisation (``io.streamed``) takes the edited tensors instead of the
checkpoint's.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter, family_spec
from prunekit.models.shards import ShardedCheckpoint, empty_model, offload, onload, onload_rotary

ATTRIBUTE = "prunekit_onloader"


class EditStore:
    """Tensors a method edited (or added) in each layer, stored on disk in ``dtype`` until materialisation."""

    def __init__(self, parent: str | Path | None = None, dtype: torch.dtype | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix=".prunekit-edits-", dir=parent))
        self.dtype = dtype
        self.layers: set[int] = set()

    def _path(self, index: int) -> Path:
        return self.directory / f"layer-{index:05d}.safetensors"

    def save(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        cast = {name: (tensor.to(self.dtype) if self.dtype else tensor).detach().contiguous().cpu()
                for name, tensor in tensors.items()}
        save_file(cast, str(self._path(index)))
        self.layers.add(index)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """The edited tensors of layer ``index`` (names relative to the layer), empty when none were edited."""
        return load_file(str(self._path(index))) if index in self.layers else {}

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class Onloader:
    """Reads a meta-device model's modules from ``checkpoint`` when asked and frees them afterwards."""

    def __init__(self, model: nn.Module, checkpoint: ShardedCheckpoint, device: torch.device | str = "cpu",
                 edits: EditStore | None = None, adapter: ArchAdapter | None = None):
        from prunekit.models.adapters import adapter_for

        check_onloadable(model)
        self.model, self.checkpoint, self.device, self.edits = model, checkpoint, torch.device(device), edits
        self.adapter = adapter or adapter_for(model)  # a pruned model passes its dense architecture's
        self._prefixes = {id(module): f"{name}." for name, module in model.named_modules() if name}
        self._versions: dict[int, dict[str, tuple[int, int]]] = {}
        onload_rotary(model, self.device)
        setattr(model, ATTRIBUTE, self)

    def prefix(self, module: nn.Module) -> str:
        return self._prefixes[id(module)]

    @contextlib.contextmanager
    def modules(self, *modules: nn.Module) -> Iterator[None]:
        """Onload ``modules`` for the duration of the block (the embeddings while layer inputs are captured)."""
        try:
            for module in modules:
                onload(module, self.prefix(module), self.checkpoint, self.device)
            yield
        finally:
            for module in modules:
                offload(module)

    def stored(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s tensors as the checkpoint stores them (names relative to it), without touching the module."""
        prefix = self.prefix(module)
        tensors = self.checkpoint.read(self.checkpoint.names(prefix), self.device)
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()}

    @contextlib.contextmanager
    def embeddings(self) -> Iterator[None]:
        """The input embedding for the duration of the block, kept in the checkpoint's dtype (an 8B model's is 1 GB
        in bf16, 2 GB in fp32) with its output cast to the model's dtype: the same values as a cast matrix."""
        embedding = self.model.get_input_embeddings()
        meta_weight = embedding.weight  # a tied head keeps pointing at it, and gets it back afterwards
        embedding.weight = nn.Parameter(self.stored(embedding)["weight"], requires_grad=False)
        handle = embedding.register_forward_hook(lambda _module, _args, output: output.to(meta_weight.dtype))
        try:
            yield
        finally:
            handle.remove()
            embedding.weight = meta_weight

    @contextlib.contextmanager
    def head(self) -> Iterator[None]:
        """The final norm and the head for the duration of the block (scoring streams that left the last layer).

        The head's matrix (the embedding's when tied) is read as stored and cast once to the model's dtype; the
        head's meta parameter comes back afterwards, so a tied pair stays one parameter.
        """
        head = self.model.get_output_embeddings()
        source = self.model.get_input_embeddings() if self.adapter.tied_embeddings else head
        meta_weight = head.weight
        head.weight = nn.Parameter(self.stored(source)["weight"].to(meta_weight.dtype), requires_grad=False)
        try:
            with self.modules(self.model.model.norm):
                yield
        finally:
            head.weight = meta_weight

    def onload_layer(self, index: int) -> nn.Module:
        layer = self.model.model.layers[index]
        onload(layer, self.prefix(layer), self.checkpoint, self.device)
        if self.edits is not None:
            self._versions[index] = _versions(layer)
        return layer

    def release_layer(self, index: int) -> None:
        """Keep what the method edited in layer ``index`` (when edits are kept) and free the layer."""
        layer = self.model.model.layers[index]
        before = self._versions.pop(index, None)
        if self.edits is not None and before is not None:
            now = _versions(layer)
            edited = {name: tensor for name, tensor in layer.state_dict().items() if now.get(name) != before.get(name)}
            self.edits.save(index, edited)
        self._drop_added(layer)
        offload(layer)

    def _drop_added(self, layer: nn.Module) -> None:
        """Remove parameters the method added (FLAP's biases; kept in the edits): the next read of the layer must
        match the checkpoint, and the writer adds them back from the plan."""
        stored = set(self.checkpoint.names(self.prefix(layer)))
        for name in [name for name, _ in layer.named_parameters() if self.prefix(layer) + name not in stored]:
            owner, _, attribute = name.rpartition(".")
            setattr(layer.get_submodule(owner), attribute, None)


def each_layer(model: nn.Module, adapter: ArchAdapter) -> Iterator[tuple[int, nn.Module]]:
    """``(index, layer)`` for every decoder layer; on an onloaded model each is read before it is yielded and freed
    (its edits kept) afterwards, so a method's pass after the calibration walk (FLAP's bias compensation) works
    on either kind of model."""
    onloader = onloader_of(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        if onloader is None:
            yield index, layer
            continue
        onloader.onload_layer(index)
        yield index, layer
        onloader.release_layer(index)


def _versions(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Identity and in-place version of each tensor: a changed pair means the method replaced or edited it."""
    return {name: (id(tensor), tensor._version) for name, tensor in module.state_dict(keep_vars=True).items()}


def onloader_of(model: nn.Module) -> Onloader | None:
    return getattr(model, ATTRIBUTE, None)


def check_onloadable(model: nn.Module) -> None:
    """Refuse, in one line, models whose non-persistent buffers (other than rotary tables) would be lost on the
    meta device: their values are computed at construction and are in no checkpoint (Gemma3's embedding scale)."""
    stored = set(model.state_dict())
    lost = [name for name, _ in model.named_buffers() if name not in stored and "rotary_emb" not in name]
    if lost:
        raise PrunekitError(f"{model.config.model_type} keeps computed buffers ({lost[0]}) that layer-by-layer "
                            "onloading cannot rebuild; use --offload none")


def open_onloaded(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  edits: EditStore | None = None) -> tuple[nn.Module, ArchAdapter, Any]:
    """A model of ``path`` (a Hugging Face directory with safetensors weights, or a prunekit checkpoint) built on
    the meta device with an :class:`Onloader` attached; returns it, the dense architecture's adapter and the
    tokenizer (None when the directory has none)."""
    from prunekit.io.checkpoint import read_manifest, read_tokenizer
    from prunekit.models.adapters import adapter_for
    from prunekit.models.loading import is_pruned_checkpoint
    from prunekit.structure.materialize import apply_plan
    from prunekit.structure.plan import PruningPlan

    directory = Path(path).expanduser()
    checkpoint = ShardedCheckpoint(directory)
    model = empty_model(dense_config(directory), dtype)
    adapter = adapter_for(model)
    if is_pruned_checkpoint(directory):
        apply_plan(model, PruningPlan.from_dict(read_manifest(directory)["plan"]), edited_weights=True)
    Onloader(model, checkpoint, device, edits, adapter)
    return model, adapter, read_tokenizer(directory)


def open_in_memory(model: nn.Module, device: torch.device | str, edits: EditStore | None = None
                   ) -> tuple[nn.Module, ArchAdapter]:
    """``--offload cpu``: a meta-device copy of ``model`` (a dense model in CPU memory) whose modules are copied to
    ``device`` when they run; returns it and its adapter. The CPU model keeps the weights and is not changed."""
    from prunekit.models.adapters import adapter_for
    from prunekit.models.shards import MemorySource

    adapter = adapter_for(model)
    dtype = next(model.parameters()).dtype
    onloaded = empty_model(model.config, dtype)
    source = {name: tensor for name, tensor in model.state_dict().items()
              if not (adapter.tied_embeddings and name == "lm_head.weight")}
    Onloader(onloaded, MemorySource(source), device, edits, adapter)
    return onloaded, adapter


def dense_config(directory: Path) -> Any:
    """The dense model's config of a model directory or of a prunekit checkpoint (which wraps it)."""
    from transformers import AutoConfig

    from prunekit.io.checkpoint import read_base_config
    from prunekit.models.loading import is_pruned_checkpoint

    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise PrunekitError(f"--offload disk reads a local model directory with config.json and safetensors "
                            f"weights; {directory} is not one (save the model with save_pretrained first)")
    if is_pruned_checkpoint(directory):
        config = AutoConfig.for_model(**read_base_config(directory / "config.json"))
    else:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    family_spec(config.model_type)
    return config
