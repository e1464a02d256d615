"""Capture what the model feeds its decoder layers, by letting the model itself run up to them.

Rebuilding the embedding output and layer arguments by hand would have to copy every family's details: Gemma3
scales embeddings by sqrt(d) in the model dtype, passes local rotary embeddings and a sliding-window mask to its
sliding layers but global ones and a causal mask to its full layers, Qwen2/3 choose masks per ``layer_types``, and
transformers changes these internals between releases. Instead every decoder layer is temporarily swapped for a
recorder that stores its hidden-state input (layer 0) and keyword arguments (every layer) and passes the hidden
states on; the last recorder aborts the forward before the final norm and LM head. Keyword arguments are recorded
once per batch size, because masks carry the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.branches import LayerContext
from prunekit.calibration.store import ActivationStore
from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter


class _StopForward(Exception):
    """Raised by a recorder to end the model forward once everything needed is recorded."""


class _LayerRecorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture."""

    def __init__(self, index: int, sink: Callable[[int, torch.Tensor, dict], None]):
        super().__init__()
        self.index = index
        self.sink = sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise PrunekitError("this model passes positional arguments to its decoder layers; it is not supported")
        self.sink(self.index, hidden_states, kwargs)
        return hidden_states


def _sanitised(kwargs: dict) -> dict:
    """Layer arguments for cache-free calibration passes (no KV cache is ever written or read)."""
    clean = dict(kwargs)
    if "past_key_values" in clean:
        clean["past_key_values"] = None
    if "use_cache" in clean:
        clean["use_cache"] = False
    return clean


def capture_layer_inputs(
    model: nn.Module,
    adapter: ArchAdapter,
    input_ids: torch.Tensor,
    batches: list[slice],
    make_store: Callable[[torch.Tensor], ActivationStore],
    progress: bool = True,
) -> tuple[ActivationStore, dict[int, list[LayerContext]]]:
    """Layer-0 inputs of all windows and, per batch size, every layer's :class:`LayerContext`.

    ``make_store`` receives the first captured batch (for its dtype and width) and returns the store to fill.
    """
    layers = adapter.decoder_layers(model)
    if len(layers) == 0:
        raise PrunekitError("the model has no decoder layers to calibrate")
    device = model.get_input_embeddings().weight.device
    contexts: dict[int, list[LayerContext]] = {}
    state: dict = {"store": None, "rows": None, "record": None}
    layer_types = list(getattr(model.config, "layer_types", None) or [None] * len(layers))

    def sink(index: int, hidden: torch.Tensor, kwargs: dict) -> None:
        if index == 0:
            if state["store"] is None:
                state["store"] = make_store(hidden)
            state["store"].write(state["rows"], hidden)
        if state["record"] is not None:
            state["record"].append(LayerContext(_sanitised(kwargs), layer_types[index]))
        if state["record"] is None or index == len(layers) - 1:
            raise _StopForward

    originals = list(layers)
    try:
        for position in range(len(layers)):
            layers[position] = _LayerRecorder(position, sink)
        with torch.no_grad():
            for rows in tqdm(batches, desc="capturing layer inputs", disable=not progress, leave=False):
                size = rows.stop - rows.start
                state["rows"], state["record"] = rows, (None if size in contexts else [])
                try:
                    model(input_ids=input_ids[rows].to(device), use_cache=False)
                except _StopForward:
                    pass
                else:
                    raise PrunekitError("the model forward did not reach its decoder layers; cannot capture inputs")
                if state["record"] is not None:
                    contexts[size] = state["record"]
    except BaseException:
        if state["store"] is not None:
            state["store"].close()
        raise
    finally:
        for position, layer in enumerate(originals):
            layers[position] = layer
    return state["store"], contexts
