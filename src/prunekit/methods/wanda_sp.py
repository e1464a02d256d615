"""Wanda-sp: structured Wanda as defined and released with FLAP (method spec ``baselines.md`` section 2).

Score of input column j of o_proj and of down_proj: ``S_j = mean_i |W_ij| · ‖X_j‖₂``, with ‖X_j‖₂ the L2 norm of
input feature j over every calibration token. A query head scores the sum over its d_h columns, a KV group the sum
over its g heads, an FFN channel its own column. The same ratio in every layer for heads and channels (the shared
allocator's ``uniform``, whose rounding to whole units is SlimGPT's and magnitude's).

Procedure, as the released code does it: layer by layer, the statistics of layer l (attention and MLP in one pass of
the still dense layer) are taken on the outputs of the already pruned layers < l; layer l is pruned and its outputs
recomputed pruned for layer l + 1. That is two passes of each layer (the spec's "about two forward passes").
``sequential=false`` scores every layer on the dense model's activations in one pass instead (needed for the global
allocation, which ranks all layers at once). No weights are changed.

Departures: GQA and q-head mode follow the toolkit's unit rules (the released code is MHA-only); the released
per-layer head count ``int(ratio * heads)`` is replaced by the shared rounding with parameter matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.calibration.statistics import NORMS, InputStatistics
from prunekit.errors import PrunekitError
from prunekit.methods.base import WIDTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import option
from prunekit.methods.width import (
    Scores,
    WidthConfig,
    allocate_scores,
    columns_per_head,
    dense_scores,
    output_linears,
    sequential_plan,
)
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.allocation import PER_LAYER


@dataclass(frozen=True)
class WandaSPConfig(WidthConfig):
    sequential: bool = option(True, "score each layer on the already pruned layers' outputs (the released "
                              "procedure); false: one pass on the dense model")
    batch_size: int = option(8, "calibration windows per forward pass", minimum=1)

    def check(self, method: str) -> None:
        if self.sequential and self.allocation not in PER_LAYER:
            raise PrunekitError(f"option allocation={self.allocation} of '{method}' ranks all layers at once, which "
                                "layer-sequential scoring cannot; add sequential=false")


@register("wanda-sp", config=WandaSPConfig, capabilities=Capabilities(WIDTH, onloading=True, distributed=True),
          description="structured Wanda: mean |W| of each o_proj / down_proj column times its input norm, "
          "layer-sequential, uniform per layer (FLAP's baseline)", calibration_tokens=128 * 128,
          calibration_seqlen=128)
def wanda_sp(context: PruneContext) -> MethodResult:
    config: WandaSPConfig = context.config
    scorer = _scorer(context.adapter)
    if config.sequential:
        plan = sequential_plan(context, "wanda-sp", config, (NORMS,), scorer, batch_size=config.batch_size)
    else:
        heads, channels = dense_scores(context, "wanda-sp", (NORMS,), scorer, batch_size=config.batch_size)
        plan = allocate_scores(context, config, heads, channels)
    return MethodResult(plan)


def _scorer(adapter: ArchAdapter):
    def score(_index: int, layer: nn.Module, statistics: dict[str, InputStatistics]) -> Scores:
        return wanda_sp_scores(layer, adapter, statistics["o_proj"].feature_norms(),
                               statistics["down_proj"].feature_norms())

    return score


def wanda_sp_scores(layer: nn.Module, adapter: ArchAdapter, head_input_norms: torch.Tensor,
                    channel_input_norms: torch.Tensor) -> Scores:
    """Per query head and per channel: Σ over the unit's columns of mean_i |W_ij| · ‖X_j‖₂."""
    linears = output_linears(adapter, layer)
    o_columns = linears["o_proj"].weight.detach().float().abs().mean(dim=0) * head_input_norms.float()
    down_columns = linears["down_proj"].weight.detach().float().abs().mean(dim=0) * channel_input_norms.float()
    return columns_per_head(o_columns, adapter.head_dim), down_columns
