"""Materialisation: make a dense model physically smaller according to a plan.

Width: q/k/v rows and o columns of the dropped heads, their q/k/v bias entries, gate/up rows and down columns of
the dropped channels are sliced away (per-head q/k norms act on d_h and are untouched). Depth: a removed attention
or MLP sub-block becomes a zero-returning stand-in with the norms of its branch replaced by Identity; a removed
layer is deleted from the ModuleList.

What transformers (5.23) reads afterwards, and how it is kept consistent:

- ``config.num_hidden_layers``: the decoder loops over ``self.layers[: config.num_hidden_layers]``; set to the new
  depth. ``config.layer_types`` (Qwen2/3, Gemma3) picks each layer's mask and rotary table by position and sizes
  the KV cache; sliced to the surviving layers. Mistral infers its cache layers from ``sliding_window``.
- each attention module's ``layer_idx`` (its KV-cache slot) and a decoder layer's ``layer_idx``: renumbered to the
  layer's new position. ``num_key_value_groups`` (used by repeat_kv / SDPA's GQA path): set to the layer's
  kept heads per kept KV head, which differs from the config in q-head mode.
- biases a method added (``plan.added_biases``, e.g. FLAP's compensation): created on the surviving o_proj /
  down_proj as zeros, so a checkpoint's values load into them strictly.
- KV cache of a removed attention block: ``DynamicCache(config=...)`` (what ``generate`` builds) turns every
  layer whose ``config.kv_sharing_modes`` entry is ``"reuse"`` into a ``DummyLayer`` that stores nothing. The
  cache then answers ``get_seq_length()`` and the mask sizes from the first real attention layer, even when layer
  0 has no attention (a plain, never-updated cache slot there would report length 0 and shift positions). The
  marker is set only when some layers keep attention and some do not.

Per-layer shapes are recorded in ``config.prunekit_layers`` (serialised with config.json); the checkpoint writer
gets the full plan as ``model.prunekit_plan`` and the dense config (a dict) as ``model.prunekit_dense_config``.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter, adapter_for
from prunekit.structure.blocks import RemovedAttention, RemovedMLP
from prunekit.structure.plan import LayerPlan, PruningPlan

# Cache-layer marker read by transformers.cache_utils.get_layer_types_and_kwargs ("reuse" -> DummyLayer).
NO_KV_CACHE = "reuse"


def apply_plan(model: nn.Module, plan: PruningPlan, edited_weights: bool = False) -> nn.Module:
    """Slice ``model`` (a dense model of a supported family) in place according to ``plan``; returns it.

    A plan whose method edited weights (``plan.weights_edited``) is refused unless ``edited_weights`` says the
    model's weights already are the edited ones, or will be loaded over it (a checkpoint): slicing a fresh dense
    model would silently give another model than the method's.
    """
    if getattr(model, "prunekit_plan", None) is not None or getattr(model.config, "prunekit_layers", None):
        raise PrunekitError("model is already pruned; apply plans to a fresh copy of the dense model")
    if plan.weights_edited and not edited_weights:
        raise PrunekitError(f"this plan's method ('{plan.method}') edited the kept weights, which a plan does not "
                            "hold, so applying it to the dense model would give another model; load the "
                            "checkpoint the plan came from instead")
    adapter = adapter_for(model)
    plan.validate(adapter)
    for layer_plan, layer in zip(plan.layers, adapter.decoder_layers(model), strict=True):
        materialize_layer(layer, layer_plan, adapter, plan.added_biases)
    return finish_structure(model, plan, adapter)


def materialize_layer(layer: nn.Module, layer_plan: LayerPlan, adapter: ArchAdapter, added_biases: list[str]) -> None:
    """Slice one decoder layer in place (its removed blocks become stand-ins); a removed layer is left alone."""
    if layer_plan.layer_removed:
        return
    with torch.no_grad():
        _apply_attention(layer, layer_plan, adapter)
        _apply_mlp(layer, layer_plan, adapter)
        add_biases(layer, layer_plan, adapter, added_biases)


def finish_structure(model: nn.Module, plan: PruningPlan, adapter: ArchAdapter) -> nn.Module:
    """After every layer is materialised: drop removed layers, renumber, update the config, attach the plan."""
    dense_config = model.config.to_dict()
    layers = adapter.decoder_layers(model)
    pairs = zip(plan.layers, layers, strict=True)
    kept = nn.ModuleList(layer for layer_plan, layer in pairs if not layer_plan.layer_removed)
    adapter.set_decoder_layers(model, kept)
    _renumber(kept, adapter)
    _update_config(model.config, plan)
    model.prunekit_plan = plan.copy()
    model.prunekit_dense_config = dense_config
    return model


def _apply_attention(layer: nn.Module, layer_plan: LayerPlan, adapter: ArchAdapter) -> None:
    if not layer_plan.has_attention:
        setattr(layer, adapter.spec.attention, RemovedAttention())
        for name in adapter.spec.attention_norms:
            setattr(layer, name, nn.Identity())
        return
    heads, kv_heads = layer_plan.kept_heads, layer_plan.kept_kv_heads
    linears = adapter.attention_linears(layer)
    dh = adapter.head_dim
    if len(heads) < adapter.num_heads:
        rows = unit_indices(heads, dh)
        _keep_rows(linears["q_proj"], rows)
        _keep_columns(linears["o_proj"], rows)
    if len(kv_heads) < adapter.num_kv_heads:
        rows = unit_indices(kv_heads, dh)
        _keep_rows(linears["k_proj"], rows)
        _keep_rows(linears["v_proj"], rows)
    # Kept heads are sorted and each kept group keeps the same count, so the new layout is again repeat_kv order.
    adapter.attention(layer).num_key_value_groups = len(heads) // len(kv_heads)


def _apply_mlp(layer: nn.Module, layer_plan: LayerPlan, adapter: ArchAdapter) -> None:
    if not layer_plan.has_mlp:
        setattr(layer, adapter.spec.mlp, RemovedMLP())
        for name in adapter.spec.mlp_norms:
            setattr(layer, name, nn.Identity())
        return
    channels = layer_plan.kept_channels
    if len(channels) < adapter.intermediate_size:
        linears = adapter.mlp_linears(layer)
        index = torch.tensor(channels, dtype=torch.long)
        _keep_rows(linears["gate_proj"], index)
        _keep_rows(linears["up_proj"], index)
        _keep_columns(linears["down_proj"], index)
        mlp = adapter.mlp(layer)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)


def add_biases(layer: nn.Module, layer_plan: LayerPlan, adapter: ArchAdapter, added: list[str]) -> None:
    """Give the surviving output projections named in ``added`` a bias (zeros) where they have none."""
    linears = {}
    if layer_plan.has_attention:
        linears["o_proj"] = adapter.attention_linears(layer)["o_proj"]
    if layer_plan.has_mlp:
        linears["down_proj"] = adapter.mlp_linears(layer)["down_proj"]
    for name in added:
        linear = linears.get(name)
        if linear is not None and linear.bias is None:
            weight = linear.weight
            linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                       weight.requires_grad)


def unit_indices(units: list[int] | torch.Tensor, width: int) -> torch.Tensor:
    """Row (or column) indices of whole units of ``width`` entries, e.g. the d_h rows of each kept head."""
    base = torch.as_tensor(units, dtype=torch.long).unsqueeze(1) * width
    return (base + torch.arange(width)).flatten()


def _keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows).clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows).clone(), linear.bias.requires_grad)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(1, columns).clone(), linear.weight.requires_grad)
    linear.in_features = len(columns)


def _renumber(layers: nn.ModuleList, adapter: ArchAdapter) -> None:
    """Give every surviving layer (and its attention, i.e. its KV-cache slot) its new position."""
    for position, layer in enumerate(layers):
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = position
        attention = adapter.attention(layer)
        if not isinstance(attention, RemovedAttention):
            attention.layer_idx = position


def _update_config(config, plan: PruningPlan) -> None:
    """Make the config describe the new depth (what transformers reads) and record per-layer shapes."""
    surviving = plan.surviving_layers()
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[index] for index in surviving]
    config.num_hidden_layers = len(surviving)
    with_attention = [plan.layers[index].has_attention for index in surviving]
    if any(with_attention) and not all(with_attention):
        config.kv_sharing_modes = [None if has else NO_KV_CACHE for has in with_attention]
    config.prunekit_layers = plan.layer_shapes()
