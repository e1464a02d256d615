"""SlimGPT (Ling et al., NeurIPS 2024, arXiv 2412.18110): layer-wise OBS structured pruning.

Per decoder layer, on the already pruned model's activations: (a) Hessian of the o_proj inputs, then Batched
Greedy Pruning of attention units (KV groups; single query heads in q-head mode) ranked by the grouped-Cholesky
error and removed one at a time with OBS compensation of the surviving o_proj columns; (b) Hessian of the
down_proj inputs of the attention-pruned layer, then greedy batches of FFN channels with Dynamic Group Size and
compensation of the surviving down_proj columns; (c) the pruned layer's outputs feed the next layer. Each branch
runs once: pruning changes only o_proj / down_proj, so the branch output is recomputed from their kept inputs. Per-layer
ratios follow the Incremental Pruning Ratio (log-increasing) schedule, solved so the global ratio hits the target.

Departures from the paper, each an option with the toolkit default from the method spec:
- ``r_0 = 0`` and ``r_last`` solved (the paper states neither); ``log(n)`` for the model's depth. The released code
  prunes LLaMA-7B to 20% with both ends given (``--min_sparsity 0.0625 --max_sparsity 0.25``, damping 0): the
  options ``first_ratio=0.0625 last_ratio=0.25 damping=0`` reproduce that schedule. The default stays the spec's
  rule because it hits any target on any depth, while the released pair is a recipe for 20% of 32 layers (its mean
  must match the target within one point, else a one-line error). ``first_ratio`` above the target is an error.
- ``match_parameters``: after rounding a layer's attention units, its channel count is set so the layer's removed
  weights match ``r_l`` (with 3 KV groups per layer, rounding heads alone is far off). ``False``: paper behaviour.
- DGS follows the released schedule (floor 64 channels per step), not the paper's text (down to 8).
- Damping 0.01·mean(diag H), ×10 on a Cholesky failure (not stated in the paper; from 0, the first retry uses
  0.001); retries are reported.
- ``inverse_update="downdate"`` (off by default; the paper re-inverts H every step) obtains the next inverse by
  a Schur-complement downdate: the same result up to rounding, several times faster on CPU.
- ``exact_ranking`` (off by default) ranks units by their true joint removal cost instead of the paper's
  diagonal approximation.
- q-head mode for one-KV-head models (Gemma-3-270M): units are single query heads, every KV group losing the same
  number; k/v are not compensated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.calibration.runner import LayerwiseRunner
from prunekit.calibration.store import OFFLOAD_MODES
from prunekit.errors import PrunekitError
from prunekit.methods.base import Capabilities, MethodResult, PruneContext, Target, register
from prunekit.methods.config import MethodConfig, option
from prunekit.methods.obs import (
    decouple,
    downdate_inverse,
    eliminate_columns,
    inverse,
    prepare_hessian,
    unit_errors,
)
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.allocation import ATTENTION_UNITS, layer_counts, resolve_attention_unit
from prunekit.structure.plan import PruningPlan
from prunekit.structure.schedules import RATIO_CAP, layer_ratios

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlimGPTConfig(MethodConfig):
    schedule: str = option("log_increase", "per-layer ratios: log_increase (the paper's Incremental Pruning Ratio) "
                           "or uniform (the paper's ablation)", choices=("log_increase", "uniform"))
    first_ratio: float = option(0.0, "log_increase: ratio of the first layer (r_0; the paper states none)",
                                minimum=0.0, below=1.0)
    last_ratio: float | None = option(None, "log_increase: ratio of the last layer; none solves it so the mean hits "
                                      "the target (the released LLaMA-7B run gives 0.0625 -> 0.25)",
                                      minimum=0.0, below=1.0)
    ratio_cap: float = option(RATIO_CAP, "no layer loses more than this share of its weights", above=0.0,
                              maximum=1.0)
    damping: float = option(0.01, "Hessian damping: H + damping * mean(diag H) * I, x10 on a failed Cholesky "
                            "(the released command uses 0)", minimum=0.0)
    compensate: bool = option(True, "OBS update of the surviving o_proj / down_proj columns (false: ablation)")
    exact_ranking: bool = option(False, "rank heads by their exact joint removal cost, not the paper's diagonal "
                                 "approximation")
    match_parameters: bool = option(True, "after rounding a layer's heads, set its channel count so the layer's "
                                    "removed weights match its ratio (false: the paper's rounding)")
    attention_unit: str = option("auto", "kv_group (whole KV groups), q_head (query heads, k/v kept) or auto "
                                 "(q_head for one-KV-head models)", choices=ATTENTION_UNITS)
    dgs_max: int = option(1024, "Dynamic Group Size: largest channel batch", minimum=1)
    dgs_min: int = option(64, "Dynamic Group Size: smallest channel batch (the released schedule's floor)",
                          minimum=1)
    inverse_update: str = option("reinvert", "reinvert H after every removal (paper) or downdate the inverse "
                                 "(faster, equal up to rounding)", choices=("reinvert", "downdate"))
    batch_size: int = option(8, "calibration windows per forward pass", minimum=1)
    offload: str = option("none", "where cached layer inputs live: none (the model's device), cpu or disk",
                          choices=OFFLOAD_MODES)

    def check(self, method: str) -> None:
        if self.dgs_min > self.dgs_max:
            raise PrunekitError(f"option dgs_min={self.dgs_min} of '{method}' is above dgs_max={self.dgs_max}")
        if self.first_ratio > self.ratio_cap:
            raise PrunekitError(f"option first_ratio={self.first_ratio} of '{method}' is above "
                                f"ratio_cap={self.ratio_cap}")


@register("slimgpt", config=SlimGPTConfig, description="OBS layer-wise pruning of heads and channels with "
          "compensation (Ling et al. 2024)", capabilities=Capabilities("width", edits_weights=True, onloading=True,
                                                                          distributed=True))
def slimgpt(context: PruneContext) -> MethodResult:
    """Prune the o_proj / down_proj inputs in place (compensated, dense shapes) and return the plan."""
    config: SlimGPTConfig = context.config
    adapter = context.adapter
    ratios = layer_ratios_for(adapter, context.target, config)
    attention_unit = resolve_attention_unit(adapter, config.attention_unit)
    plan = PruningPlan.keep_all(adapter)
    report: list[dict[str, Any]] = []
    with LayerwiseRunner(context.model, adapter, context.windows("slimgpt"), batch_size=config.batch_size,
                         offload=config.offload, progress=context.progress, split_windows=True) as runner:
        for index, layer in runner.layers():
            counts = layer_counts(ratios[index], adapter, attention_unit, config.match_parameters)
            entry: dict[str, Any] = {"layer": index, "ratio": round(ratios[index], 5)}
            if counts.attention_units:
                entry["attention"] = _prune_attention_layer(
                    runner, index, layer, adapter, plan, counts, attention_unit == "q_head", config
                )
                runner.finish_branch(index, "attention")
            else:
                runner.run_branch(index, "attention")
            if counts.channels:
                entry["mlp"] = _prune_mlp_layer(runner, index, layer, adapter, plan, counts.channels, config)
                runner.finish_branch(index, "mlp")
            else:
                runner.run_branch(index, "mlp")
            report.append(entry)
            log.info(_describe(entry, plan, index))
    plan.metrics["slimgpt_layers"] = report
    return MethodResult(plan)


def layer_ratios_for(adapter: ArchAdapter, target: Target, config: SlimGPTConfig) -> list[float]:
    """The per-layer ratios of decoder-layer weights for the configured schedule."""
    return layer_ratios(adapter.num_layers, target.layer_linear_ratio(adapter), config.schedule,
                        first=config.first_ratio, last=config.last_ratio, cap=config.ratio_cap)


def _describe(entry: dict[str, Any], plan: PruningPlan, index: int) -> str:
    layer = plan.layers[index]
    return (f"layer {index:3d}: r={entry['ratio']:.3f} heads {len(layer.kept_heads)}/{plan.dense['num_heads']} "
            f"channels {len(layer.kept_channels)}/{plan.dense['intermediate_size']}")


# -- attention: Batched Greedy Pruning -------------------------------------------------------------------------

def _prune_attention_layer(runner, index, layer, adapter, plan, counts, q_head_mode, config) -> dict[str, Any]:
    o_proj = adapter.attention_linears(layer)["o_proj"]
    statistics = runner.collect_branch(index, "attention")
    weight = o_proj.weight.detach().float().clone()
    hessian, hessian_inverse, damping = prepare_hessian(statistics.take_hessian(), weight, config.damping,
                                                        keep_hessian=config.inverse_update == "reinvert")
    g, dh = adapter.heads_per_group, adapter.head_dim
    width = dh if q_head_mode else g * dh
    quota = counts.attention_units if q_head_mode else None
    total = counts.attention_units * (adapter.num_kv_heads if q_head_mode else 1)
    removed, error = _greedy_units(weight, hessian, width, total, config, hessian_inverse,
                                   group_of=(lambda unit: unit // g) if q_head_mode else None, quota=quota)
    with torch.no_grad():
        o_proj.weight.copy_(weight.to(o_proj.weight.dtype))
    if q_head_mode:
        plan.keep_heads(index, [head for head in range(adapter.num_heads) if head not in removed])
    else:
        plan.keep_kv_groups(index, [group for group in range(adapter.num_kv_heads) if group not in removed])
    return {"removed_units": sorted(removed), "error": error, "damping": damping.damping, "retries": damping.retries}


def _greedy_units(weight, hessian, width, total, config, hessian_inverse=None, group_of=None, quota=None):
    """Remove ``total`` units one at a time: rank by grouped-Cholesky error, eliminate the best, decouple.

    ``group_of`` / ``quota`` (q-head mode): a unit is eligible only while its KV group has lost fewer than
    ``quota`` heads, so every group ends with the same number of query heads.
    """
    units = weight.shape[1] // width
    removed: list[int] = []
    total_error = 0.0
    for step in range(total):
        if hessian_inverse is None or step and config.inverse_update == "reinvert":
            hessian_inverse = inverse(hessian)
        errors = unit_errors(weight, hessian_inverse, width, exact=config.exact_ranking)
        for unit in range(units):
            group_full = group_of is not None and sum(group_of(u) == group_of(unit) for u in removed) >= quota
            if unit in removed or group_full:
                errors[unit] = float("inf")
        best = int(torch.argmin(errors))  # first minimum: ties go to the lowest unit index
        gone = [column for unit in removed for column in range(unit * width, (unit + 1) * width)]
        columns = list(range(best * width, (best + 1) * width))
        removed.append(best)
        total_error += _remove(weight, hessian_inverse, hessian, columns, gone, config.compensate)
        hessian_inverse = _next_inverse(hessian_inverse, columns, config.inverse_update)
    return removed, total_error


def _next_inverse(hessian_inverse, columns, inverse_update):
    """The downdated inverse, or None when the next step re-inverts the decoupled Hessian (the paper's way)."""
    if inverse_update == "downdate":
        return downdate_inverse(hessian_inverse, columns)
    if inverse_update != "reinvert":
        raise PrunekitError(f"unknown inverse_update '{inverse_update}'; use reinvert or downdate")
    return None


def _remove(weight, hessian_inverse, hessian, columns, already_removed, compensate) -> float:
    """Eliminate ``columns`` (with OBS compensation unless disabled) and decouple them in the Hessian.

    Only surviving columns are compensated; earlier removed ones are decoupled and stay zero.
    """
    excluded = set(columns) | set(already_removed)
    live = [column for column in range(weight.shape[1]) if column not in excluded]
    if compensate:
        error = eliminate_columns(weight, hessian_inverse, columns, live)
    else:
        error = float("nan")
        weight[:, columns] = 0
    if hessian is not None:  # None when the inverse is downdated: H is never needed again
        decouple(hessian, columns)
    return error


# -- MLP: Dynamic Group Size -------------------------------------------------------------------------------------

def dgs_group_sizes(total: int, largest: int = 1024, smallest: int = 64) -> list[int]:
    """Channel batch sizes of the released DGS schedule: g₀ = ⌊(T − 512)/2⌋, then g ← ⌊(g − 512)/2⌋ (unclamped),
    each step taking min(remaining, clamp(g, smallest, largest))."""
    if smallest < 1 or largest < smallest:
        raise PrunekitError(f"DGS group sizes need 1 <= smallest <= largest, got {smallest} and {largest}")
    sizes, remaining, group = [], total, (total - 512) // 2
    while remaining > 0:
        size = min(remaining, max(smallest, min(largest, group)))
        sizes.append(size)
        remaining -= size
        group = (group - 512) // 2
    return sizes


def _greedy_channels(weight, hessian, channels, config, hessian_inverse=None) -> tuple[list[int], float]:
    """Remove ``channels`` input columns in DGS batches: each batch the lowest ``||W_j||² / [H⁻¹]_jj``, eliminated
    together with compensation, then decoupled (SlimGPT 2.4). Returns the removed columns in order and the error."""
    removed: list[int] = []
    total_error = 0.0
    for size in dgs_group_sizes(channels, config.dgs_max, config.dgs_min):
        if hessian_inverse is None:
            hessian_inverse = inverse(hessian)
        scores = (weight**2).sum(dim=0) / torch.diagonal(hessian_inverse)
        scores[removed] = float("inf")
        batch = torch.sort(scores, stable=True).indices[:size].tolist()  # stable: ties go to the lowest index
        total_error += _remove(weight, hessian_inverse, hessian, batch, removed, config.compensate)
        removed.extend(batch)
        hessian_inverse = _next_inverse(hessian_inverse, batch, config.inverse_update)
    return removed, total_error


def _prune_mlp_layer(runner, index, layer, adapter, plan, channels, config) -> dict[str, Any]:
    down_proj = adapter.mlp_linears(layer)["down_proj"]
    statistics = runner.collect_branch(index, "mlp")
    weight = down_proj.weight.detach().float().clone()
    hessian, hessian_inverse, damping = prepare_hessian(statistics.take_hessian(), weight, config.damping,
                                                        keep_hessian=config.inverse_update == "reinvert")
    removed, total_error = _greedy_channels(weight, hessian, channels, config, hessian_inverse)
    with torch.no_grad():
        down_proj.weight.copy_(weight.to(down_proj.weight.dtype))
    kept = sorted(set(range(adapter.intermediate_size)) - set(removed))
    plan.keep_channels(index, kept)
    return {"removed_channels": len(removed), "error": total_error, "damping": damping.damping,
            "retries": damping.retries, "groups": dgs_group_sizes(channels, config.dgs_max, config.dgs_min)}
