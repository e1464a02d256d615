"""The layer-sequential calibration pipeline shared by the layer-wise pruners.

SlimGPT, Wanda-sp, FLAP, LLM-BIP and ShortGPT all walk the decoder one layer at a time: gather statistics of a
layer's linears on the inputs that the *already pruned* earlier layers produce, prune the layer, push the
calibration windows through it, continue. :class:`LayerwiseRunner` owns that walk. Only the current layer's input
activations ``[n, L, d]`` are held (on the device, the CPU or disk), and outputs overwrite them batch by batch.

SlimGPT's pattern: each branch runs once, with the inputs of its output linear kept, so that after the pruner
has edited that linear (zeroed and compensated columns) the branch output is recomputed by one matmul::

    with LayerwiseRunner(model, adapter, windows, offload="cpu") as runner:
        for index, layer in runner.layers():
            stats = runner.collect_branch(index, "attention")     # o_proj inputs: statistics, kept
            prune_attention(layer, stats.hessian())               # edits o_proj only
            runner.finish_branch(index, "attention")              # stream += o_proj(kept inputs)
            stats = runner.collect_branch(index, "mlp")           # down_proj inputs
            prune_mlp(layer, stats.hessian())
            runner.finish_branch(index, "mlp")                    # the layer's outputs; next layer
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.calibration.branches import (
    LayerContext,
    attention_branch,
    branch_module,
    branch_norms,
    check_branch,
    mlp_branch,
    output_linear,
    replay_branch,
    run_branch,
)
from prunekit.calibration.capture import capture_layer_inputs
from prunekit.calibration.exchange import BatchExchange, batch_share
from prunekit.calibration.statistics import HESSIAN, InputStatistics, input_statistics
from prunekit.calibration.store import ActivationStore, check_offload
from prunekit.data.windows import TokenWindows
from prunekit.distributed import world
from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter
from prunekit.models.onloading import onloader_of

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
        split_windows: bool = False,
    ):
        input_ids = windows.input_ids if isinstance(windows, TokenWindows) else windows
        if input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise PrunekitError(
                "calibration windows must be a non-empty [n, seqlen] tensor, got "
                f"{tuple(input_ids.shape)}"
            )
        if batch_size < 1:
            raise PrunekitError(f"the calibration batch size must be at least 1, got {batch_size}")
        # Under torchrun, split_windows gives each process every N-th mini-batch of the windows; the statistics of
        # every pass are exchanged and folded in batch order before the caller sees them (calibration.exchange).
        self._exchange: BatchExchange | None = None
        if split_windows and world().active:
            input_ids, self._exchange = _share_of(input_ids, batch_size)
        self.model, self.adapter = model, adapter
        self.offload, self.offload_dir = check_offload(offload), offload_dir
        self.batch_size, self.progress = batch_size, progress
        self.num_windows, self.seqlen = int(input_ids.shape[0]), int(input_ids.shape[1])
        self._layers = adapter.decoder_layers(model)
        self._position = 0
        self._mid_layer = False  # the stream holds layer `position`'s post-attention residual, not its inputs
        self._kept: tuple[int, str, ActivationStore, tuple] | None = None
        self._onloader = onloader_of(model)  # weights on disk: each layer is read when reached (models.onloading)
        with self._onloader.embeddings() if self._onloader else nullcontext():
            self._inputs, self._contexts = capture_layer_inputs(
                model, adapter, input_ids, self.batches(), self._new_store_like, progress
            )

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _new_store_like(self, sample: torch.Tensor) -> ActivationStore:
        shape = (self.num_windows, self.seqlen, sample.shape[-1])
        return ActivationStore(shape, sample.dtype, sample.device, self.offload, self.offload_dir)

    def batches(self) -> list[slice]:
        """The window mini-batches, in order; every pass uses the same ones."""
        return _batches(self.num_windows, self.batch_size)

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

    def _check_position(self, index: int, mid_layer: bool = False) -> nn.Module:
        if index != self._position:
            raise PrunekitError(f"the runner holds the inputs of layer {self._position}, not of layer {index}")
        if mid_layer != self._mid_layer:
            where = "after its attention branch" if self._mid_layer else "at its inputs"
            raise PrunekitError(f"layer {index} is {where}; finish its branches in order (attention, then mlp)")
        return self._layers[index]

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """Yield ``(index, layer)`` from the current position on; the caller must ``advance(index)`` each one.

        On an onloaded model the layer is read from disk before it is yielded and freed (its edits kept) once the
        caller asks for the next one.
        """
        start = self._position
        for index in tqdm(range(start, self.num_layers), desc="layers", disable=not self.progress,
                          initial=start, total=self.num_layers):
            if self._onloader:
                self._onloader.onload_layer(index)
            yield index, self._layers[index]
            if self._position != index + 1:
                raise PrunekitError(
                    f"layer {index} was not advanced; call runner.advance({index}) "
                    "before the next layer"
                )
            if self._onloader:
                self._onloader.release_layer(index)

    # -- passes --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(
        self,
        index: int,
        linears: Mapping[str, nn.Module],
        kinds: Iterable[str] = (HESSIAN,),
        stop_after: str = "mlp",
    ) -> dict[str, InputStatistics]:
        """Run layer ``index`` over all windows with ``linears`` hooked; return their input statistics.

        ``stop_after="attention"`` runs only the attention branch (enough for o_proj or q/k/v statistics).
        The layer's inputs are left untouched.
        """
        layer = self._check_position(index)
        if stop_after not in STOP_POINTS:
            raise PrunekitError(f"unknown stop point '{stop_after}'; use attention or mlp")
        self._drop_kept()
        with input_statistics(linears, kinds, self._exchange) as statistics:
            for rows in self.batches():
                context = self.context(index, rows.stop - rows.start)
                middle = attention_branch(self.adapter, layer, self.inputs.read(rows), context)
                if stop_after == "mlp":
                    mlp_branch(self.adapter, layer, middle)
        self._combine(statistics)
        return statistics

    @torch.no_grad()
    def advance(
        self,
        index: int,
        linears: Mapping[str, nn.Module] | None = None,
        kinds: Iterable[str] = (HESSIAN,),
        on_batch: BatchObserver | None = None,
    ) -> dict[str, InputStatistics]:
        """Run the (possibly pruned) layer ``index`` over all windows; its outputs become the next layer's inputs.

        ``linears`` are hooked during this pass (one pass for statistics *and* outputs, as FLAP and ShortGPT
        need). ``on_batch(rows, inputs, outputs)`` sees every mini-batch before its inputs are overwritten; the
        tensors are only valid during the call.
        """
        layer = self._check_position(index)
        self._drop_kept()
        with input_statistics(linears or {}, kinds, self._exchange) as statistics:
            try:
                for rows in self.batches():
                    inputs = self.inputs.read(rows)
                    outputs = _hidden_of(layer(inputs, **self.context(index, rows.stop - rows.start).kwargs))
                    if on_batch is not None:
                        on_batch(rows, inputs, outputs)
                    self.inputs.write(rows, outputs)
            except BaseException:
                self.close()  # inputs are half overwritten: nothing valid is left to continue from
                raise
        self._position = index + 1
        self._combine(statistics)
        return statistics

    def _combine(self, statistics: Mapping[str, InputStatistics]) -> None:
        """Statistics of all windows: under torchrun, this process's batches folded with the others'."""
        for stats in statistics.values():
            stats.finish()
        _check_seen(statistics)

    # -- one branch at a time ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect_branch(self, index: int, branch: str, kinds: Iterable[str] = (HESSIAN,)) -> InputStatistics:
        """Run ``branch`` of layer ``index`` over all windows; keep the inputs of its output linear, return their
        statistics. The stream is left untouched until :meth:`finish_branch`, which uses the kept inputs.

        Between the two calls only the output linear (o_proj / down_proj) and the branch's post-norm may change;
        an edit anywhere else in the branch is detected at :meth:`finish_branch` (except writes through
        ``parameter.data``, which are invisible).
        """
        layer = self._check_position(index, mid_layer=check_branch(branch) == "mlp")
        linear = output_linear(self.adapter, layer, branch)
        self._drop_kept()

        def run(rows: slice) -> None:
            run_branch(self.adapter, layer, branch, self.inputs.read(rows), self.context(index, rows.stop - rows.start))

        statistics = self._keeping_inputs(index, layer, branch, {branch: linear}, kinds, run)
        return statistics[branch]

    def _keeping_inputs(self, index: int, layer: nn.Module, branch: str, linears: Mapping[str, nn.Module],
                        kinds: Iterable[str], run: Callable[[slice], None]) -> dict[str, InputStatistics]:
        """``run`` every batch with ``linears`` hooked and the inputs of ``branch``'s output linear kept."""
        kept: list[ActivationStore] = []
        current_rows: list[slice] = []

        def keep(_module: nn.Module, args: tuple) -> None:
            if not kept:
                kept.append(self._new_store_like(args[0]))
            kept[0].write(current_rows[-1], args[0])

        handle = output_linear(self.adapter, layer, branch).register_forward_pre_hook(keep)
        try:
            with input_statistics(linears, kinds, self._exchange) as statistics:
                for rows in self.batches():
                    current_rows.append(rows)
                    run(rows)
        except BaseException:
            for store in kept:
                store.close()
            raise
        finally:
            handle.remove()
        self._combine(statistics)
        self._kept = (index, branch, kept[0], self._branch_fingerprint(layer, branch))
        return statistics

    # -- whole layer, attention kept -----------------------------------------------------------------------
    @torch.no_grad()
    def collect_keeping_attention(self, index: int, linears: Mapping[str, nn.Module],
                                  kinds: Iterable[str] = (HESSIAN,)) -> dict[str, InputStatistics]:
        """:meth:`collect` over the whole layer that also keeps its o_proj inputs, so that
        ``finish_branch(index, "attention")`` recomputes the attention output by one matmul and only
        ``run_branch(index, "mlp")`` runs again (Wanda-sp's layer-sequential procedure: dense-layer statistics,
        then the pruned layer's outputs)."""
        layer = self._check_position(index)
        self._drop_kept()

        def run(rows: slice) -> None:
            context = self.context(index, rows.stop - rows.start)
            mlp_branch(self.adapter, layer, attention_branch(self.adapter, layer, self.inputs.read(rows), context))

        return self._keeping_inputs(index, layer, "attention", linears, kinds, run)

    @torch.no_grad()
    def finish_branch(self, index: int, branch: str) -> None:
        """Add ``branch``'s output, recomputed from the kept inputs through the current output linear, to the
        stream. After the MLP branch the stream holds the layer's outputs and the runner moves to the next layer."""
        layer = self._check_position(index, mid_layer=check_branch(branch) == "mlp")
        if self._kept is None or self._kept[:2] != (index, branch):
            raise PrunekitError(f"no kept inputs for the {branch} branch of layer {index}; call collect_branch first")
        if self._kept[3] != self._branch_fingerprint(layer, branch):
            raise PrunekitError(f"the {branch} branch of layer {index} changed outside its output linear after "
                                "collect_branch; its kept inputs are stale (collect again)")
        features = self._kept[2]
        try:
            for rows in self.batches():
                self.inputs.write(rows, replay_branch(self.adapter, layer, branch, self.inputs.read(rows),
                                                      features.read(rows)))
        except BaseException:
            self.close()
            raise
        self._drop_kept()
        self._after_branch(index, branch)

    @torch.no_grad()
    def run_branch(self, index: int, branch: str) -> None:
        """Run ``branch`` of layer ``index`` over all windows and add it to the stream, collecting nothing."""
        layer = self._check_position(index, mid_layer=check_branch(branch) == "mlp")
        self._drop_kept()
        try:
            for rows in self.batches():
                self.inputs.write(rows, run_branch(self.adapter, layer, branch, self.inputs.read(rows),
                                                   self.context(index, rows.stop - rows.start)))
        except BaseException:
            self.close()
            raise
        self._after_branch(index, branch)

    def _after_branch(self, index: int, branch: str) -> None:
        self._mid_layer = branch == "attention"
        if branch == "mlp":
            self._position = index + 1

    # -- kept branch inputs ---------------------------------------------------------------------------------
    def _branch_fingerprint(self, layer: nn.Module, branch: str) -> tuple:
        """Identity and in-place version of the branch's modules except its output linear and post-norm."""
        linear = output_linear(self.adapter, layer, branch)
        pre, post = branch_norms(self.adapter, layer, branch)
        exempt = {id(p) for p in linear.parameters()} | {id(p) for p in (post.parameters() if post else ())}
        modules = [branch_module(self.adapter, layer, branch), pre]
        return tuple((id(module), tuple((id(p), p.data_ptr(), p._version) for p in module.parameters()
                                        if id(p) not in exempt))
                     for module in modules)

    def _drop_kept(self) -> None:
        if self._kept is not None:
            self._kept[2].close()
            self._kept = None

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free all cached activations and delete any offload files."""
        self._drop_kept()
        if self._inputs is not None:
            self._inputs.close()
            self._inputs = None

    def __enter__(self) -> LayerwiseRunner:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.is_meta:  # an onloaded layer not read yet runs on the inputs' device
        return default
    return parameter.device


def _hidden_of(output: torch.Tensor | tuple) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5; older releases returned a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def _share_of(input_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, BatchExchange]:
    """This process's windows: its batches, concatenated in order. Every batch but the last holds ``batch_size``
    windows, so the runner's own batching of the share gives back exactly these batches."""
    here = world()
    batches = _batches(int(input_ids.shape[0]), batch_size)
    mine = batch_share(batches, here)
    return torch.cat([input_ids[rows] for rows in mine]), BatchExchange(len(batches), here)


def _check_seen(statistics: Mapping[str, InputStatistics]) -> None:
    """A hooked linear that saw nothing means the wrong pass or a removed branch: fail now, not in the solver."""
    for name, stats in statistics.items():
        if stats.tokens == 0:
            raise PrunekitError(
                f"linear '{name}' received no inputs in this pass (removed "
                "branch, or wrong stop_after?)"
            )
