"""Masked forwards: a dense model computing what a pruned one would, by multiplying instead of slicing.

A :class:`UnitMask` holds keep values for every query head, FFN channel and decoder layer of a dense model (1 keeps,
0 drops; head and channel values multiply, so fractions scale a unit, while a layer is kept whenever its value is
non-zero), optionally one row per sequence of a batch (``batch`` leading dimension), so the
samples of one policy-gradient step can run as one forward with a different mask per row. A KV group is masked by
masking its g query heads (``from_kv_groups``): a KV head reaches the output only through its query heads.

:class:`MaskedForward` owns the hooks that apply a mask to a live model, and is the only thing that registers them:

- attention: the o_proj input (the heads' outputs after the attention-weighted sum of values) is multiplied by the
  head mask, broadcast over d_h;
- MLP: the down_proj input (act(gate) * up) is multiplied by the channel mask;
- a projection with a bias (o_proj / down_proj) also has its output multiplied by "this row keeps any unit of the
  block", so a fully masked block adds exactly zero, as a removed block does;
- layer bypass: the decoder layer's output is replaced by its input where the layer mask is 0 (the layer still
  runs; its result is discarded).

Every hook is removed when the ``with`` block ends, also on an exception. The guard test checks, for every family,
that the masked dense model gives the logits of the plan materialised from the same mask (``to_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.plan import PruningPlan


@dataclass
class UnitMask:
    """Keep values per query head ``[.., L, n_q]``, FFN channel ``[.., L, d_ff]`` and layer ``[.., L]``."""

    heads: torch.Tensor
    channels: torch.Tensor
    layers: torch.Tensor

    def __post_init__(self) -> None:
        if self.layers.dim() not in (1, 2) or not (self.heads.shape[:-1] == self.channels.shape[:-1]
                                                    == self.layers.shape):
            raise PrunekitError(f"mask shapes disagree: heads {tuple(self.heads.shape)}, channels "
                                f"{tuple(self.channels.shape)}, layers {tuple(self.layers.shape)}")

    @property
    def batched(self) -> bool:
        return self.layers.dim() == 2

    @classmethod
    def keep_all(cls, adapter: ArchAdapter, batch: int | None = None) -> UnitMask:
        lead = () if batch is None else (batch,)
        layers = adapter.num_layers
        return cls(torch.ones(*lead, layers, adapter.num_heads), torch.ones(*lead, layers, adapter.intermediate_size),
                   torch.ones(*lead, layers))

    @classmethod
    def from_kv_groups(cls, groups: torch.Tensor, channels: torch.Tensor, layers: torch.Tensor,
                       heads_per_group: int) -> UnitMask:
        """A mask from per-KV-group keep values ``[.., L, n_kv]``: each group's value covers its g query heads."""
        return cls(groups.repeat_interleave(heads_per_group, dim=-1), channels, layers)

    @classmethod
    def from_plan(cls, plan: PruningPlan) -> UnitMask:
        """The mask that keeps exactly what ``plan`` keeps."""
        dense = plan.dense
        mask = cls(torch.zeros(len(plan.layers), dense["num_heads"]),
                   torch.zeros(len(plan.layers), dense["intermediate_size"]), torch.zeros(len(plan.layers)))
        for index, layer in enumerate(plan.layers):
            mask.heads[index, layer.kept_heads] = 1.0
            mask.channels[index, layer.kept_channels] = 1.0
            mask.layers[index] = 0.0 if layer.layer_removed else 1.0
        return mask

    def to_plan(self, adapter: ArchAdapter, **meta) -> PruningPlan:
        """The plan keeping the units whose mask is non-zero (unbatched masks only); it must be a valid plan."""
        if self.batched:
            raise PrunekitError("a batched mask has one plan per row; take a row first (mask.row(i))")
        plan = PruningPlan.keep_all(adapter, **meta)
        for index in range(adapter.num_layers):
            if not self.layers[index]:
                plan.remove_layer(index)
                continue
            plan.keep_heads(index, self.heads[index].nonzero().flatten().tolist())
            plan.keep_channels(index, self.channels[index].nonzero().flatten().tolist())
        plan.validate(adapter)
        return plan

    def row(self, index: int) -> UnitMask:
        """One sequence's mask of a batched mask."""
        return UnitMask(self.heads[index], self.channels[index], self.layers[index])


class MaskedForward:
    """Applies a :class:`UnitMask` to ``model`` while the ``with`` block runs; ``mask`` can change between
    forwards (``set_mask``) without re-registering anything. A batched mask needs forwards of that batch size."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, mask: UnitMask | None = None):
        self.model, self.adapter = model, adapter
        self.mask = mask
        self._handles: list[RemovableHandle] = []

    def set_mask(self, mask: UnitMask | None) -> None:
        """The mask for the next forwards (None: run dense)."""
        self.mask = mask

    def __enter__(self) -> MaskedForward:
        if self._handles:
            raise PrunekitError("this MaskedForward is already active")
        try:
            for index, layer in enumerate(self.adapter.decoder_layers(self.model)):
                self._hook_layer(index, layer)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook_layer(self, index: int, layer: nn.Module) -> None:
        o_proj = self.adapter.attention_linears(layer)["o_proj"]
        down_proj = self.adapter.mlp_linears(layer)["down_proj"]
        self._handles.append(o_proj.register_forward_pre_hook(self._input_hook(index, "heads")))
        self._handles.append(down_proj.register_forward_pre_hook(self._input_hook(index, "channels")))
        for linear, kind in ((o_proj, "heads"), (down_proj, "channels")):
            if linear.bias is not None:
                self._handles.append(linear.register_forward_hook(self._bias_hook(index, kind)))
        self._handles.append(layer.register_forward_hook(self._bypass_hook(index), with_kwargs=True))

    def _values(self, kind: str, index: int, batch: int) -> torch.Tensor | None:
        """This layer's keep values of ``kind`` as ``[B or 1, units]``, or None without a mask."""
        if self.mask is None:
            return None
        values = getattr(self.mask, kind)[..., index, :] if kind != "layers" else self.mask.layers[..., index]
        if self.mask.batched and values.shape[0] != batch:
            raise PrunekitError(f"the mask has {values.shape[0]} rows but the forward has {batch} sequences")
        return values.reshape(values.shape[0] if self.mask.batched else 1, -1)

    def _input_hook(self, index: int, kind: str):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            inputs = args[0]
            values = self._values(kind, index, inputs.shape[0])
            if values is None:
                return args
            values = values.to(device=inputs.device, dtype=inputs.dtype)
            if kind == "heads":  # [B, T, n_q * d_h] -> heads of d_h features
                shaped = inputs.unflatten(-1, (values.shape[-1], -1)) * values[:, None, :, None]
                return (shaped.flatten(-2), *args[1:])
            return (inputs * values[:, None, :], *args[1:])

        return hook

    def _bias_hook(self, index: int, kind: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            values = self._values(kind, index, output.shape[0])
            if values is None:
                return output
            alive = (values != 0).any(dim=-1).to(device=output.device, dtype=output.dtype)
            return output * alive[:, None, None]

        return hook

    def _bypass_hook(self, index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            values = self._values("layers", index, hidden.shape[0])
            if values is None:
                return output
            result = output[0] if isinstance(output, tuple) else output
            keep = (values != 0).to(result.device)[:, :, None]  # [B or 1, 1, 1]
            bypassed = torch.where(keep, result, hidden)
            return (bypassed, *output[1:]) if isinstance(output, tuple) else bypassed

        return hook
