"""Losses of sampled masks: the forward passes of a policy-gradient step, in three exact ways.

- ``masked`` (as released): one forward per sample, the dense model with the sample's mask applied by the shared
  mask hooks (:class:`~prunekit.structure.masks.MaskedForward`).
- ``batched`` (spec speed-up 1): the K samples of a step as one forward of K·B sequences, each row with its own
  mask (a batched :class:`~prunekit.structure.masks.UnitMask`).
- ``sliced`` (spec speed-up 2): one forward per sample of the model with only its kept heads and channels
  gathered, run through ``torch.func.functional_call`` with the sliced weights, so compute shrinks with the keep
  fraction and the model's own weights are never touched. A block with no kept unit in a sample keeps one unit
  whose output columns (and output bias) are zeroed, which adds exactly zero as a removed block does; a dropped
  layer (layer units) zeroes both of its blocks, so its output is its input.

All three give the same losses up to floating-point summation order (a test checks it on every family). The model
runs under ``torch.inference_mode``: no autograd graph is ever built and no weight gets a gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from prunekit.calibration.branches import head_logits
from prunekit.calibration.runner import LayerwiseRunner
from prunekit.evaluation.perplexity import window_nll_sums
from prunekit.models.adapters import ArchAdapter
from prunekit.models.onloading import each_layer, onloader_of
from prunekit.structure.masks import MaskedForward, UnitMask
from prunekit.structure.materialize import unit_indices

EXECUTIONS = ("masked", "batched", "sliced")
Mask = Mapping[str, torch.Tensor]


def row_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of every sequence, in fp32 ``[rows]`` (perplexity's NLL sums per window)."""
    return window_nll_sums(logits, input_ids.to(logits.device)) / (input_ids.shape[1] - 1)


class SampleForwards:
    """Loss of the model under each of several masks on one mini-batch; used as a context manager."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, attention_unit: str, execution: str):
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}")
        self.model, self.adapter, self.attention_unit, self.execution = model, adapter, attention_unit, execution
        self._masked = MaskedForward(model, adapter)
        self._names = {module: name for name, module in model.named_modules()}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SampleForwards:
        self._stack.enter_context(torch.inference_mode())
        if self.execution != "sliced":
            self._stack.enter_context(self._masked)
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def losses(self, input_ids: torch.Tensor, masks: Sequence[Mask]) -> list[float]:
        """One mean loss per mask, over every token of ``input_ids`` ``[B, T]``."""
        if onloader_of(self.model) is not None:
            return self._onloaded_losses(input_ids, masks)
        input_ids = input_ids.to(self.device)
        if self.execution == "batched":
            self._masked.set_mask(self.unit_mask_batched(masks, input_ids.shape[0]))
            rows = input_ids.repeat(len(masks), 1)
            per_row = row_losses(self.model(rows, use_cache=False).logits, rows).view(len(masks), -1)
            return per_row.mean(dim=1).tolist()
        return [self.loss(input_ids, mask) for mask in masks]

    def loss(self, input_ids: torch.Tensor, mask: Mask) -> float:
        """The loss under one mask (masked or sliced execution; batched runs one mask as a plain masked forward)."""
        if onloader_of(self.model) is not None:
            return self._onloaded_losses(input_ids, [mask])[0]
        input_ids = input_ids.to(self.device)
        if self.execution == "sliced":
            with self._sliced_attention_groups(mask):
                weights = self._sliced_weights(mask)
                logits = functional_call(self.model, weights, (input_ids,), {"use_cache": False}, strict=False)
                logits = logits.logits
        else:
            self._masked.set_mask(self.unit_mask(mask))
            logits = self.model(input_ids, use_cache=False).logits
        return float(row_losses(logits, input_ids).mean())

    def _onloaded_losses(self, input_ids: torch.Tensor, masks: Sequence[Mask]) -> list[float]:
        """Masked execution on an onloaded model: every sample's stream advances through a layer while it is
        loaded once (the same layer calls as the model's own forward, so the same losses), then the head."""
        onloader = onloader_of(self.model)
        with LayerwiseRunner(self.model, self.adapter, input_ids, batch_size=input_ids.shape[0],
                             progress=False) as runner:
            rows = slice(0, input_ids.shape[0])
            streams = [runner.inputs.read(rows) for _ in masks]
            kwargs = [runner.context(index, input_ids.shape[0]).kwargs for index in range(self.adapter.num_layers)]
            for index, layer in each_layer(self.model, self.adapter):
                for sample, mask in enumerate(masks):
                    self._masked.set_mask(self.unit_mask(mask))
                    output = layer(streams[sample], **kwargs[index])
                    streams[sample] = output[0] if isinstance(output, tuple) else output
            with onloader.head():
                return [float(row_losses(head_logits(self.model, stream), input_ids).mean()) for stream in streams]

    # -- masked / batched ------------------------------------------------------------------------------------
    def unit_mask(self, mask: Mask) -> UnitMask:
        layers = mask.get("layers", torch.ones(self.adapter.num_layers))
        if self.attention_unit == "q_head":
            return UnitMask(mask["attention"], mask["channels"], layers)
        return UnitMask.from_kv_groups(mask["attention"], mask["channels"], layers, self.adapter.heads_per_group)

    def unit_mask_batched(self, masks: Sequence[Mask], batch: int) -> UnitMask:
        """Each sample's mask repeated over its ``batch`` rows, samples one after another."""
        singles = [self.unit_mask(mask) for mask in masks]
        stack = {field: torch.stack([getattr(single, field) for single in singles]).repeat_interleave(batch, dim=0)
                 for field in ("heads", "channels", "layers")}
        return UnitMask(**stack)

    # -- sliced ----------------------------------------------------------------------------------------------
    def _kept(self, mask: Mask, kind: str, index: int) -> torch.Tensor:
        """Layer ``index``'s kept unit indices of ``kind`` (none when its layer is dropped)."""
        keep = mask[kind][index].bool()
        if "layers" in mask and not mask["layers"][index]:
            keep = torch.zeros_like(keep)
        return keep.nonzero().flatten()

    def _head_units(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query heads, KV heads) of kept attention units."""
        g = self.adapter.heads_per_group
        if self.attention_unit == "q_head":
            return kept, torch.arange(self.adapter.num_kv_heads)
        return (kept[:, None] * g + torch.arange(g)).flatten(), kept

    @contextlib.contextmanager
    def _sliced_attention_groups(self, mask: Mask) -> Iterator[None]:
        """In q-head mode a sample's layers keep different numbers of query heads per KV head: set each layer's
        ``num_key_value_groups`` (what repeat_kv reads) for the forward, and restore it after."""
        if self.attention_unit != "q_head":
            yield
            return
        modules = [self.adapter.attention(layer) for layer in self.adapter.decoder_layers(self.model)]
        saved = [module.num_key_value_groups for module in modules]
        try:
            for index, module in enumerate(modules):
                heads = max(1, len(self._kept(mask, "attention", index)))
                module.num_key_value_groups = heads // self.adapter.num_kv_heads
            yield
        finally:
            for module, value in zip(modules, saved, strict=True):
                module.num_key_value_groups = value

    def _sliced_weights(self, mask: Mask) -> dict[str, torch.Tensor]:
        weights: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(self.adapter.decoder_layers(self.model)):
            self._slice_attention(weights, layer, self._kept(mask, "attention", index))
            self._slice_mlp(weights, layer, self._kept(mask, "channels", index))
        return weights

    def _slice_attention(self, weights: dict, layer: nn.Module, kept: torch.Tensor) -> None:
        linears, dh = self.adapter.attention_linears(layer), self.adapter.head_dim
        empty = kept.numel() == 0
        heads, kv_heads = self._head_units(kept if not empty else torch.tensor([0]))
        head_rows, kv_rows = unit_indices(heads, dh), unit_indices(kv_heads, dh)
        self._rows(weights, linears["q_proj"], head_rows)
        self._rows(weights, linears["k_proj"], kv_rows)
        self._rows(weights, linears["v_proj"], kv_rows)
        self._columns(weights, linears["o_proj"], head_rows, zero=empty)

    def _slice_mlp(self, weights: dict, layer: nn.Module, kept: torch.Tensor) -> None:
        linears = self.adapter.mlp_linears(layer)
        empty = kept.numel() == 0
        channels = kept if not empty else torch.tensor([0])
        self._rows(weights, linears["gate_proj"], channels)
        self._rows(weights, linears["up_proj"], channels)
        self._columns(weights, linears["down_proj"], channels, zero=empty)

    def _rows(self, weights: dict, linear: nn.Linear, rows: torch.Tensor) -> None:
        name, rows = self._names[linear], rows.to(linear.weight.device)
        weights[f"{name}.weight"] = linear.weight.index_select(0, rows)
        if linear.bias is not None:
            weights[f"{name}.bias"] = linear.bias.index_select(0, rows)

    def _columns(self, weights: dict, linear: nn.Linear, columns: torch.Tensor, zero: bool) -> None:
        """Keep ``columns``; ``zero``: the block keeps nothing, so its one stand-in column and its bias are 0."""
        name, columns = self._names[linear], columns.to(linear.weight.device)
        weight = linear.weight.index_select(1, columns)
        weights[f"{name}.weight"] = torch.zeros_like(weight) if zero else weight
        if linear.bias is not None and zero:
            weights[f"{name}.bias"] = torch.zeros_like(linear.bias)

