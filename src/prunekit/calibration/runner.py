"""The layer-sequential calibration pipeline shared by the layer-wise pruners.

SlimGPT, Wanda-sp, FLAP, LLM-BIP and ShortGPT all walk the decoder one layer at a time: gather statistics of a
layer's linears on the inputs that the *already pruned* earlier layers produce, prune the layer, push the
calibration windows through it, continue. :class:`LayerwiseRunner` owns that walk. Only the current layer's input
activations ``[n, L, d]`` are held (on the device, the CPU or disk), and outputs overwrite them batch by batch.

SlimGPT's pattern, with its exact speed-up (the MLP pass reuses the post-attention residual of pass b)::

    with LayerwiseRunner(model, adapter, windows, offload="cpu") as runner:
        for index, layer in runner.layers():
            o_proj = adapter.attention_linears(layer)["o_proj"]
            stats = runner.collect(index, {"o_proj": o_proj}, stop_after="attention")      # (a)
            prune_attention(layer, stats["o_proj"].hessian())
            down = adapter.mlp_linears(layer)["down_proj"]
            stats = runner.collect(index, {"down_proj": down}, keep_residual=True)         # (b)
            prune_mlp(layer, stats["down_proj"].hessian())
            runner.advance(index)                                                          # (c), MLP branch only
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.branches import LayerContext, attention_branch, mlp_branch
from prunekit.calibration.capture import capture_layer_inputs
from prunekit.calibration.statistics import HESSIAN, InputStatistics, input_statistics
from prunekit.calibration.store import ActivationStore, check_offload
from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter

STOP_POINTS = ("attention", "mlp")
BatchObserver = Callable[[slice, torch.Tensor, torch.Tensor], None]


class LayerwiseRunner:
    """Feeds calibration windows through a model one decoder layer at a time (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ArchAdapter,
        windows: TokenWindows | torch.Tensor,
        batch_size: int = 8,
        offload: str = "none",
        offload_dir: str | Path | None = None,
        progress: bool = True,
    ):
        input_ids = windows.input_ids if isinstance(windows, TokenWindows) else windows
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise PrunekitError(f"calibration windows must be a non-empty [n, seqlen] tensor, got {tuple(input_ids.shape)}")
        if batch_size < 1:
            raise PrunekitError(f"the calibration batch size must be at least 1, got {batch_size}")
        self.model, self.adapter = model, adapter
        self.offload, self.offload_dir = check_offload(offload), offload_dir
        self.batch_size, self.progress = batch_size, progress
        self.num_windows, self.seqlen = int(input_ids.shape[0]), int(input_ids.shape[1])
        self._layers = adapter.decoder_layers(model)
        self._position = 0
        self._residual: tuple[int, ActivationStore, tuple] | None = None
        self._inputs, self._contexts = capture_layer_inputs(
            model, adapter, input_ids, self.batches(), self._new_store_like, progress
        )

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _new_store_like(self, sample: torch.Tensor) -> ActivationStore:
        shape = (self.num_windows, self.seqlen, sample.shape[-1])
        return ActivationStore(shape, sample.dtype, sample.device, self.offload, self.offload_dir)

    def batches(self) -> list[slice]:
        """The window mini-batches, in order; every pass uses the same ones."""
        return [slice(start, min(start + self.batch_size, self.num_windows))
                for start in range(0, self.num_windows, self.batch_size)]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def position(self) -> int:
        """Index of the layer whose inputs are currently held (``num_layers`` once every layer is done)."""
        return self._position

    @property
    def inputs(self) -> ActivationStore:
        """The inputs of layer ``position``; after the last layer, the residual stream entering the final norm."""
        if self._inputs is None:
            raise PrunekitError("this calibration runner was closed")
        return self._inputs

    def context(self, index: int, batch_size: int) -> LayerContext:
        """What the model passes to layer ``index`` for a batch of ``batch_size`` windows, on the layer's device."""
        if batch_size not in self._contexts:
            raise PrunekitError(f"no layer arguments were captured for batch size {batch_size}; use runner.batches()")
        return self._contexts[batch_size][index].on(_device_of(self._layers[index], self.inputs.device))

    def _check_position(self, index: int) -> nn.Module:
        if index != self._position:
            raise PrunekitError(f"the runner holds the inputs of layer {self._position}, not of layer {index}")
        return self._layers[index]

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """Yield ``(index, layer)`` from the current position on; the caller must ``advance(index)`` each one."""
        start = self._position
        for index in tqdm(range(start, self.num_layers), desc="layers", disable=not self.progress,
                          initial=start, total=self.num_layers):
            yield index, self._layers[index]
            if self._position != index + 1:
                raise PrunekitError(f"layer {index} was not advanced; call runner.advance({index}) before the next layer")

    # -- passes --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(
        self,
        index: int,
        linears: Mapping[str, nn.Module],
        kinds: Iterable[str] = (HESSIAN,),
        stop_after: str = "mlp",
        keep_residual: bool = False,
    ) -> dict[str, InputStatistics]:
        """Run layer ``index`` over all windows with ``linears`` hooked; return their input statistics.

        ``stop_after="attention"`` runs only the attention branch (enough for o_proj or q/k/v statistics).
        ``keep_residual`` keeps the post-attention residual so that the next :meth:`advance` runs only the MLP
        branch. Do not edit the attention branch in between (or pass ``reuse_residual=False`` there): replaced
        modules or parameters and in-place edits through a parameter are detected and trigger a recompute, but
        writes through ``parameter.data`` are invisible. The layer's inputs are left untouched.
        """
        layer = self._check_position(index)
        if stop_after not in STOP_POINTS:
            raise PrunekitError(f"unknown stop point '{stop_after}'; use attention or mlp")
        self._drop_residual()
        residual = self._inputs_like() if keep_residual else None
        try:
            with input_statistics(linears, kinds) as statistics:
                for rows in self.batches():
                    context = self.context(index, rows.stop - rows.start)
                    middle = attention_branch(self.adapter, layer, self.inputs.read(rows), context)
                    if residual is not None:
                        residual.write(rows, middle)
                    if stop_after == "mlp":
                        mlp_branch(self.adapter, layer, middle)
        except BaseException:
            if residual is not None:
                residual.close()
            raise
        if residual is not None:
            self._residual = (index, residual, self._attention_fingerprint(layer))
        _check_seen(statistics)
        return statistics

    @torch.no_grad()
    def advance(
        self,
        index: int,
        linears: Mapping[str, nn.Module] | None = None,
        kinds: Iterable[str] = (HESSIAN,),
        reuse_residual: bool = True,
        on_batch: BatchObserver | None = None,
    ) -> dict[str, InputStatistics]:
        """Run the (possibly pruned) layer ``index`` over all windows; its outputs become the next layer's inputs.

        ``linears`` are hooked during this pass (one pass for statistics *and* outputs, as FLAP and ShortGPT
        need). ``on_batch(rows, inputs, outputs)`` sees every mini-batch before its inputs are overwritten; the
        tensors are only valid during the call. A residual kept by :meth:`collect` is reused when allowed and
        still valid, in which case only the MLP branch runs and no attention linear can be hooked.
        """
        layer = self._check_position(index)
        residual = self._usable_residual(index, layer) if reuse_residual else None
        with input_statistics(linears or {}, kinds) as statistics:
            try:
                for rows in self.batches():
                    inputs = self.inputs.read(rows) if residual is None or on_batch is not None else None
                    if residual is not None:
                        outputs = mlp_branch(self.adapter, layer, residual.read(rows))
                    else:
                        outputs = _hidden_of(layer(inputs, **self.context(index, rows.stop - rows.start).kwargs))
                    if on_batch is not None:
                        on_batch(rows, inputs, outputs)
                    self.inputs.write(rows, outputs)
            except BaseException:
                self.close()  # inputs are half overwritten: nothing valid is left to continue from
                raise
        self._drop_residual()
        self._position = index + 1
        _check_seen(statistics)
        return statistics

    # -- kept residual -------------------------------------------------------------------------------------
    def _inputs_like(self) -> ActivationStore:
        store = self.inputs
        return ActivationStore(store.shape, store.dtype, store.device, self.offload, self.offload_dir)

    def _attention_fingerprint(self, layer: nn.Module) -> tuple:
        """Identity and in-place version of everything on the attention branch, to detect edits after a collect."""
        modules = [self.adapter.attention(layer), *self.adapter.attention_norm_modules(layer).values()]
        return tuple((id(module), tuple((id(p), p.data_ptr(), p._version) for p in module.parameters()))
                     for module in modules)

    def _usable_residual(self, index: int, layer: nn.Module) -> ActivationStore | None:
        if self._residual is None:
            return None
        kept_index, store, fingerprint = self._residual
        if kept_index != index or fingerprint != self._attention_fingerprint(layer):
            self._drop_residual()
            return None
        return store

    def _drop_residual(self) -> None:
        if self._residual is not None:
            self._residual[1].close()
            self._residual = None

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free all cached activations and delete any offload files."""
        self._drop_residual()
        if self._inputs is not None:
            self._inputs.close()
            self._inputs = None

    def __enter__(self) -> LayerwiseRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else default


def _hidden_of(output: torch.Tensor | tuple) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5; older releases returned a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _check_seen(statistics: Mapping[str, InputStatistics]) -> None:
    """A hooked linear that saw nothing means the wrong pass or a removed branch: fail now, not in the solver."""
    for name, stats in statistics.items():
        if stats.tokens == 0:
            raise PrunekitError(f"linear '{name}' received no inputs in this pass (removed branch, or wrong stop_after?)")
