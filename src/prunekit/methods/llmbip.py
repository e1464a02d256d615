"""LLM-BIP (toolkit definition following the paper's description; Wu, arXiv 2412.06419; no public code).

Method spec ``llmbip.md``. Every query head and FFN channel is scored by how much removing it can change the output
of its own block, propagated with absolute weights through the rest of the block (o_proj -> residual -> MLP), from
one forward pass of the dense model and no gradients:

- a_j = Σ_t |x_tj| over the o_proj input columns, b_k = Σ_t |z_tk| over the down_proj input columns (hooks, fp64);
- propagation vector c = 1 + |up|ᵀ (|down|ᵀ 1), i.e. c_i = 1 + Σ_k |up[k, i]| · ‖down[:, k]‖₁;
- head score s_H(h) = Σ_{j ∈ h} a_j · Σ_o |o[o, j]| c_o (a KV group sums its g heads), channel score
  s_F(k) = b_k · ‖down[:, k]‖₁.

What the bound promises: a channel's score equals the L1 change of the block output (summed over tokens and output
features) when that channel alone is removed, exactly, since the channel is the last map of the block. A head's
score bounds the change of the attention output it causes (the ``1`` in c) plus the MLP's reaction as if the MLP
were the linear map |W_U||W_D| with no norm; that is a true upper bound when the MLP is linear and unnormalised,
and a heuristic otherwise (gate, norm and activation can amplify). The tests check both statements.

Variants, as options: ``propagation=gated`` (V1) linearises SwiGLU around the calibration statistics,
c_i = 1 + Σ_k ‖down[:, k]‖₁ (α_k |up[k, i]| + β_k |gate[k, i]|) with α_k = mean_t |act(g_tk)| and
β_k = mean_t |act'(g_tk) · u_tk| (g, u: gate and up outputs), from the same pass; ``allocation=global`` (V2:
z-scored per layer and unit type, ranked together, weighted by parameter cost); ``sequential=true`` rescoring each
layer on the pruned layers' outputs. Default allocation: LLM-Pruner's layer range (first ceil(n/8) and last
ceil(n/16) layers intact, the same ratio in the others). GQA and q-head mode are the toolkit's extension (the
paper's models are MHA). Norms are ignored in the bound (spec open point 2).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from prunekit.calibration.statistics import ABS_SUMS, InputStatistics
from prunekit.errors import PrunekitError
from prunekit.methods.base import WIDTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import option
from prunekit.methods.width import (
    Scores,
    WidthConfig,
    allocate_scores,
    allocation_option,
    columns_per_head,
    dense_scores,
    sequential_plan,
)
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.allocation import PER_LAYER

LABEL = "LLM-BIP (toolkit definition following the paper's description)"


@dataclass(frozen=True)
class LLMBIPConfig(WidthConfig):
    allocation: str = allocation_option("layer_range", "layer_range (the spec's default: LLM-Pruner's range, one "
                                        "ratio), global (V2: z-scored, all layers ranked together), uniform or "
                                        "log_increase")
    propagation: str = option("described", "head propagation factor: described (|W_U||W_D|, the paper) or gated "
                              "(V1: SwiGLU linearised with calibration statistics)", choices=("described", "gated"))
    sequential: bool = option(False, "rescore each layer on the pruned layers' outputs instead of the dense model's")
    batch_size: int = option(8, "calibration windows per forward pass", minimum=1)

    def check(self, method: str) -> None:
        if self.sequential and self.allocation not in PER_LAYER:
            raise PrunekitError(f"option sequential=true of '{method}' needs a per-layer allocation, not "
                                f"allocation={self.allocation}")


@register("llmbip", config=LLMBIPConfig, capabilities=Capabilities(WIDTH, onloading=True, distributed=True),
          description=f"{LABEL}: block-wise forward importance propagation of heads and channels, one pass",
          calibration_tokens=64 * 512, calibration_seqlen=512)
def llmbip(context: PruneContext) -> MethodResult:
    config: LLMBIPConfig = context.config
    adapter = context.adapter
    gates: dict[int, GateStatistics] = {}

    def score(index: int, layer: nn.Module, statistics: dict[str, InputStatistics]) -> Scores:
        gate = gates.pop(index, None)
        return llmbip_scores(layer, adapter, statistics["o_proj"].absolute_sums(),
                             statistics["down_proj"].absolute_sums(), gate)

    @contextmanager
    def gate_hooks(index: int, layer: nn.Module):
        with gate_statistics(layer, adapter) as statistics:
            yield
        gates[index] = statistics

    hooks = gate_hooks if config.propagation == "gated" else None
    if config.sequential:
        plan = sequential_plan(context, "llmbip", config, (ABS_SUMS,), score, batch_size=config.batch_size,
                               layer_hooks=hooks)
    else:
        heads, channels = dense_scores(context, "llmbip", (ABS_SUMS,), score, batch_size=config.batch_size,
                                       layer_hooks=hooks)
        plan = allocate_scores(context, config, heads, channels)
    plan.metrics["method_label"] = LABEL
    return MethodResult(plan)


def propagation_vector(layer: nn.Module, adapter: ArchAdapter, gate: GateStatistics | None = None) -> torch.Tensor:
    """c ∈ R^d: 1 + |up|ᵀ ‖down[:, k]‖₁ (described), or the gate-aware factor when ``gate`` statistics are given."""
    mlp = adapter.mlp_linears(layer)
    down_l1 = mlp["down_proj"].weight.detach().double().abs().sum(dim=0)  # [d_ff]
    up = mlp["up_proj"].weight.detach().double().abs()  # [d_ff, d]
    if gate is None:
        return 1.0 + up.T @ down_l1
    gate_weight = mlp["gate_proj"].weight.detach().double().abs()
    return 1.0 + up.T @ (down_l1 * gate.alpha) + gate_weight.T @ (down_l1 * gate.beta)


def llmbip_scores(layer: nn.Module, adapter: ArchAdapter, head_abs_sums: torch.Tensor,
                  channel_abs_sums: torch.Tensor, gate: GateStatistics | None = None) -> Scores:
    """Per query head s_H and per channel s_F (module docstring), in float64."""
    linears = adapter.attention_linears(layer), adapter.mlp_linears(layer)
    c = propagation_vector(layer, adapter, gate)
    o_columns = linears[0]["o_proj"].weight.detach().double().abs().T @ c  # Σ_o |o[o, j]| c_o, per column j
    heads = columns_per_head(head_abs_sums.double() * o_columns, adapter.head_dim)
    channels = channel_abs_sums.double() * linears[1]["down_proj"].weight.detach().double().abs().sum(dim=0)
    return heads, channels


@dataclass
class GateStatistics:
    """V1's per-channel α_k = mean_t |act(g_tk)| and β_k = mean_t |act'(g_tk) u_tk| (float64)."""

    alpha: torch.Tensor
    beta: torch.Tensor


@contextmanager
def gate_statistics(layer: nn.Module, adapter: ArchAdapter):
    """Hook the gate and up projections of ``layer``; the yielded statistics are filled in when the block ends.

    The gate output of a forward is held until the up projection of the same forward runs (gate first, as every
    supported family computes ``down(act(gate(x)) * up(x))``).
    """
    mlp, linears = adapter.mlp(layer), adapter.mlp_linears(layer)
    width = linears["up_proj"].weight.shape[0]
    sums = {"alpha": torch.zeros(width, dtype=torch.float64), "beta": torch.zeros(width, dtype=torch.float64)}
    pending: list[torch.Tensor] = []
    count = [0]

    def on_gate(_module, _args, output):
        pending.append(output.detach())

    def on_up(_module, _args, output):
        if not pending:
            raise PrunekitError("the MLP ran its up projection before its gate; gated propagation cannot pair them")
        g = pending.pop().reshape(-1, width).float()
        u = output.detach().reshape(-1, width).float()
        activated, slope = _activation_and_slope(mlp.act_fn, g)
        sums["alpha"] += activated.abs().sum(dim=0, dtype=torch.float64).cpu()
        sums["beta"] += (slope * u).abs().sum(dim=0, dtype=torch.float64).cpu()
        count[0] += g.shape[0]

    statistics = GateStatistics(sums["alpha"], sums["beta"])
    handles = [linears["gate_proj"].register_forward_hook(on_gate), linears["up_proj"].register_forward_hook(on_up)]
    try:
        yield statistics
    finally:
        for handle in handles:
            handle.remove()
    if count[0] == 0:
        raise PrunekitError("the MLP saw no tokens while its gate statistics were collected")
    statistics.alpha /= count[0]
    statistics.beta /= count[0]


def _activation_and_slope(act_fn: nn.Module, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act(g) and act'(g): closed form for SiLU (Llama, Qwen, Mistral: a third of the cost of autograd), autograd
    for any other element-wise activation (Gemma's tanh GELU)."""
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        sigmoid = torch.sigmoid(g)
        return g * sigmoid, sigmoid * (1 + g * (1 - sigmoid))
    with torch.enable_grad():
        leaf = g.clone().requires_grad_(True)
        activated = act_fn(leaf)
        (slope,) = torch.autograd.grad(activated.sum(), leaf)
    return activated.detach(), slope
