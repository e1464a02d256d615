"""FLAP (An et al., AAAI 2024, arXiv 2312.11983): fluctuation metric, adaptive structure, bias compensation.

Method spec ``baselines.md`` section 3. One layer-by-layer pass of the dense model collects, for the inputs of every
o_proj and down_proj, the mean and the unbiased variance of each input feature over all calibration tokens. Then:

- **metric** of column j: ``WIFV`` (default) Var(X_j) · ‖W[:, j]‖₂², ``IFV`` Var(X_j), ``WIFN`` mean_i |W_ij| · ‖X_j‖₂;
  as in the released code the attention metric is squared (the MLP metric is not);
- **standardised** per layer and module: Ŝ = (S − mean S) / std S over the layer's columns; a query head scores the
  mean Ŝ of its d_h columns, a KV group the mean over its g·d_h columns, a channel its Ŝ_j;
- **adaptive structure** (``allocation=global``, FLAP's AL-AM, the default): heads and channels of all layers ranked
  together, each weighted by its parameter cost, cut where the removed parameters are closest to the target, at least
  one KV group per layer. ``uniform`` is FLAP's UL-UM; ``layer_range`` and ``log_increase`` are the shared modes;
- **bias compensation**: for the removed columns P of o_proj and down_proj, b ← b + Σ_{j∈P} W[:, j] · mean(X_j), so
  the pruned layer gives the dense layer's output on the calibration mean. A model without those biases gets them
  (``plan.added_biases``; they count in ratio_all and are saved in the checkpoint).

Departures from the released code, named: the fluctuation is the true unbiased variance over all tokens (the
release updates once per sequence with an aliased running mean, so its statistic is a square of deviations from the
updated mean); GQA and q-head mode follow the toolkit's unit rules (the release is MHA-only, head_dim 128); FLAP's
manual head-count structures (UL-MM, AL-MM) are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.calibration.statistics import MOMENTS, NORMS, InputStatistics
from prunekit.methods.base import WIDTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import option
from prunekit.methods.width import (
    Scores,
    WidthConfig,
    allocate_scores,
    allocation_option,
    columns_per_head,
    dense_scores,
    output_linears,
    removed_columns,
)
from prunekit.models.adapters import ArchAdapter
from prunekit.models.onloading import each_layer
from prunekit.structure.plan import PruningPlan

METRICS = ("WIFV", "IFV", "WIFN")


@dataclass(frozen=True)
class FLAPConfig(WidthConfig):
    allocation: str = allocation_option("global", "global (FLAP's AL-AM: all layers and both unit types ranked "
                                        "together), uniform (UL-UM), layer_range or log_increase")
    metric: str = option("WIFV", "column metric: WIFV (variance x squared column norm), IFV (variance) or WIFN "
                         "(Wanda-like)", choices=METRICS)
    compensate: bool = option(True, "fold the mean of the removed inputs into the o_proj / down_proj bias")
    batch_size: int = option(8, "calibration windows per forward pass", minimum=1)


@register("flap", config=FLAPConfig, capabilities=Capabilities(WIDTH, edits_weights=True, distributed=True,
                                                                  onloading=True),
          description="fluctuation of each o_proj / down_proj input column, standardised, ranked across layers, "
          "with bias compensation (An et al. 2024)", calibration_tokens=1024 * 128, calibration_seqlen=128)
def flap(context: PruneContext) -> MethodResult:
    config: FLAPConfig = context.config
    adapter = context.adapter
    means: dict[int, dict[str, torch.Tensor]] = {}

    def score(index: int, layer: nn.Module, statistics: dict[str, InputStatistics]) -> Scores:
        means[index] = {name: stats.mean() for name, stats in statistics.items()}
        return flap_scores(layer, adapter, statistics, config.metric)

    kinds = (MOMENTS, NORMS) if config.metric == "WIFN" else (MOMENTS,)
    heads, channels = dense_scores(context, "flap", kinds, score, batch_size=config.batch_size)
    # Head scores are means of standardised columns, so a KV group is the mean of its heads (not their sum), and
    # the allocator must not standardise again.
    plan = allocate_scores(context, config, heads, channels, reduce="mean", standardize=False)
    if config.compensate:
        compensate_biases(context.model, adapter, plan, means)
    return MethodResult(plan)


def column_metrics(layer: nn.Module, adapter: ArchAdapter, statistics: dict[str, InputStatistics],
                   metric: str) -> dict[str, torch.Tensor]:
    """The raw metric S_j of every o_proj and down_proj input column (attention squared, as released)."""
    result = {}
    for name, linear in output_linears(adapter, layer).items():
        stats, weight = statistics[name], linear.weight.detach().float()
        if metric == "WIFV":
            values = stats.variance() * weight.pow(2).sum(dim=0)
        elif metric == "IFV":
            values = stats.variance()
        else:
            values = weight.abs().mean(dim=0) * stats.feature_norms()
        result[name] = values.pow(2) if name == "o_proj" else values
    return result


def standardized(values: torch.Tensor) -> torch.Tensor:
    """(S − mean S) / std S, unbiased std as torch.std (all zeros when S is constant)."""
    values = values.double()
    spread = values.std()
    return ((values - values.mean()) / spread if spread > 0 else torch.zeros_like(values)).float()


def flap_scores(layer: nn.Module, adapter: ArchAdapter, statistics: dict[str, InputStatistics],
                metric: str = "WIFV") -> Scores:
    """Per query head: mean standardised metric of its columns; per channel: its standardised metric."""
    metrics = column_metrics(layer, adapter, statistics, metric)
    heads = columns_per_head(standardized(metrics["o_proj"]), adapter.head_dim, reduce="mean")
    return heads, standardized(metrics["down_proj"])


@torch.no_grad()
def compensate_biases(model: nn.Module, adapter: ArchAdapter, plan: PruningPlan,
                      means: dict[int, dict[str, torch.Tensor]]) -> None:
    """b ← b + W[:, P] · mean(X_P) for the removed columns P; biases created where the model has none."""
    added = set()
    for index, layer in each_layer(model, adapter):  # onloaded: each layer read, edited and kept in turn
        linears = output_linears(adapter, layer)
        for name, columns in removed_columns(plan, adapter, index):
            if not len(columns):
                continue
            linear = linears[name]
            weight = linear.weight
            shift = weight[:, columns].float() @ means[index][name][columns].to(weight.device)
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
                                           requires_grad=False)
                added.add(name)
            linear.bias.add_(shift.to(linear.bias.dtype))
    plan.added_biases = sorted(set(plan.added_biases) | added)
