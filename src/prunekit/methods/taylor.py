"""LLM-Pruner's first-order Taylor group importance (Ma et al., NeurIPS 2023; method spec ``baselines.md`` s. 6).

The only width method here that needs a backward pass. L is the language-model loss of the calibration windows; its
gradient with respect to every decoder-layer linear weight is accumulated over micro-batches (each micro-batch's
mean loss weighted by its share of the windows, so the sum is the gradient of the loss over all windows while only
one micro-batch's activations are alive at a time; ``gradient_checkpointing`` trades a second forward for less
activation memory). Embeddings, norms and lm_head get no gradient (they are never pruned). Then, per member of a
group (a row of q/k/v/gate/up, a column of o/down):

- ``element`` (Element¹, the toolkit default): Σ_k |W_k · ∂L/∂W_k|;
- ``vector``: |Σ_k W_k · ∂L/∂W_k|;

summed over the members of the group: a KV group is its k and v rows plus the q rows and o columns of its g query
heads; in q-head mode a query head is its q rows and o columns; an FFN channel its gate and up rows and its down
column. Allocation default: the same ratio in LLM-Pruner's layer range (first ceil(n/8), last ceil(n/16) layers
intact), converted from the parameter target (the paper's group ratio is not a parameter ratio).

Cost: one forward and one backward over the calibration tokens (about three forward passes of compute), and a
gradient buffer the size of the decoder-layer weights. Before starting, the memory one micro-batch needs is estimated
and a run that would not fit is refused in one line.

Departures, named: the GQA group of a query head is its own KV group (LLM-Pruner's ``llama3.py`` strides the q/o
Taylor terms across groups, crediting group h with heads h, h + n_kv, ...; spec "What the released code really
does"); the per-layer counts are the shared rounding (the released ``n = C - int(C (1 - R))`` selects no head below
1/3 with three KV groups); biases are not members; Element² and the mixed order are not offered.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.methods.base import WIDTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import option
from prunekit.methods.width import Scores, WidthConfig, allocate_scores, allocation_option, check_allocation
from prunekit.models.adapters import ArchAdapter

VARIANTS = ("element", "vector")


@dataclass(frozen=True)
class TaylorConfig(WidthConfig):
    allocation: str = allocation_option("layer_range", "layer_range (LLM-Pruner's: one ratio, first ceil(n/8) and "
                                        "last ceil(n/16) layers intact), uniform, log_increase or global")
    variant: str = option("element", "element (Element¹: sum of |w * grad|) or vector (|sum of w * grad| per row "
                          "or column)", choices=VARIANTS)
    micro_batch: int = option(2, "calibration windows per forward/backward (memory is bounded by one of them)",
                              minimum=1)
    gradient_checkpointing: bool = option(False, "recompute layer activations in the backward pass (less memory, "
                                          "one more forward)")


@register("taylor", config=TaylorConfig, capabilities=Capabilities(WIDTH, needs_gradients=True),
          description="LLM-Pruner's first-order Taylor importance of KV groups and channels (one backward pass)",
          calibration_tokens=10 * 64, calibration_seqlen=64)
def taylor(context: PruneContext) -> MethodResult:
    config: TaylorConfig = context.config
    check_allocation(context)
    calibration = context.windows("taylor")
    windows = calibration if isinstance(calibration, torch.Tensor) else calibration.input_ids
    check_memory(context.model, context.adapter, min(config.micro_batch, windows.shape[0]), windows.shape[1],
                 config.gradient_checkpointing)
    with layer_gradients(context.model, context.adapter, config.gradient_checkpointing):
        accumulate_gradients(context.model, windows, config.micro_batch, context.progress)
        heads, channels = [], []
        for layer in context.adapter.decoder_layers(context.model):
            head_row, channel_row = taylor_scores(layer, context.adapter, config.variant)
            heads.append(head_row)
            channels.append(channel_row)
    return MethodResult(allocate_scores(context, config, heads, channels))


@contextmanager
def layer_gradients(model: nn.Module, adapter: ArchAdapter, checkpointing: bool):
    """Gradients on for the decoder-layer linear weights only, training-free otherwise; all restored on exit."""
    previous = {parameter: parameter.requires_grad for parameter in model.parameters()}
    weights = [linear.weight for layer in adapter.decoder_layers(model)
               for linears in (adapter.attention_linears(layer), adapter.mlp_linears(layer))
               for linear in linears.values()]
    was_checkpointing = bool(getattr(model, "is_activation_checkpointing", False))
    try:
        for parameter in previous:
            parameter.requires_grad_(False)
        for weight in weights:
            weight.requires_grad_(True)
            weight.grad = None
        if checkpointing:
            _enable_checkpointing(model)
        yield weights
    finally:
        for weight in weights:
            weight.grad = None
        for parameter, wanted in previous.items():
            parameter.requires_grad_(wanted)
        if checkpointing and not was_checkpointing:
            (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _enable_checkpointing(model: nn.Module) -> None:
    """transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def accumulate_gradients(model: nn.Module, input_ids: torch.Tensor, micro_batch: int, progress: bool = True) -> float:
    """∂L/∂W of the mean next-token loss over all windows, summed into ``.grad`` micro-batch by micro-batch."""
    device = next(model.parameters()).device
    total, loss_sum = input_ids.shape[0], 0.0
    starts = range(0, total, micro_batch)
    for start in tqdm(starts, desc="taylor backward", disable=not progress):
        batch = input_ids[start:start + micro_batch].to(device)
        with torch.enable_grad():
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * (batch.shape[0] / total)
            loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def _members(weight: torch.Tensor, dim: int, variant: str) -> torch.Tensor:
    """Per row (``dim=1`` summed) or column (``dim=0``) of one weight: Σ|w g| or |Σ w g|."""
    if weight.grad is None:
        raise PrunekitError("a layer weight received no gradient; is the model's forward using all its layers?")
    product = weight.detach().float() * weight.grad.float()
    return product.abs().sum(dim=dim) if variant == "element" else product.sum(dim=dim).abs()


def taylor_scores(layer: nn.Module, adapter: ArchAdapter, variant: str = "element") -> Scores:
    """Per query head (q rows + o columns, plus an equal share of its KV head's k/v rows) and per channel.

    A KV group's score, the sum of its heads' scores, is then exactly its q, k, v rows and o columns. In q-head
    mode k/v stay, so the KV share is the same for every head of a group and does not change which heads go.
    """
    attention, mlp = adapter.attention_linears(layer), adapter.mlp_linears(layer)
    dh, g = adapter.head_dim, adapter.heads_per_group
    q = _members(attention["q_proj"].weight, 1, variant).view(-1, dh).sum(dim=1)
    o = _members(attention["o_proj"].weight, 0, variant).view(-1, dh).sum(dim=1)
    kv = (_members(attention["k_proj"].weight, 1, variant) + _members(attention["v_proj"].weight, 1, variant))
    kv_share = kv.view(-1, dh).sum(dim=1).repeat_interleave(g) / g
    channels = (_members(mlp["gate_proj"].weight, 1, variant) + _members(mlp["up_proj"].weight, 1, variant)
                + _members(mlp["down_proj"].weight, 0, variant))
    return (q + o + kv_share).double(), channels.double()


def backward_bytes(model: nn.Module, adapter: ArchAdapter, micro_batch: int, seqlen: int, checkpointing: bool) -> int:
    """A rough upper estimate of the memory one micro-batch's forward and backward add to the model's own."""
    element = next(model.parameters()).element_size()
    tokens = micro_batch * seqlen
    d, d_ff, layers = adapter.hidden_size, adapter.intermediate_size, adapter.num_layers
    gradients = sum(weight.numel() for layer in adapter.decoder_layers(model)
                    for linears in (adapter.attention_linears(layer), adapter.mlp_linears(layer))
                    for weight in (linear.weight for linear in linears.values()))
    per_layer = tokens * (12 * d + 5 * d_ff) + micro_batch * adapter.num_heads * seqlen * seqlen
    saved = layers * tokens * d + per_layer if checkpointing else layers * per_layer
    vocabulary = model.get_output_embeddings().weight.shape[0]
    logits = 4 * tokens * vocabulary  # logits, their fp32 copy, log-softmax and its gradient
    return (gradients + saved) * element + logits * 4


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the model lives: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def check_memory(model: nn.Module, adapter: ArchAdapter, micro_batch: int, seqlen: int, checkpointing: bool) -> None:
    """One line, before any work, when one micro-batch's backward would not fit."""
    needed = backward_bytes(model, adapter, micro_batch, seqlen, checkpointing)
    free = available_bytes(next(model.parameters()).device)
    if free is not None and needed > free:
        hint = "lower micro_batch" + ("" if checkpointing else " or set gradient_checkpointing=true")
        raise PrunekitError(f"taylor needs about {needed / 2**30:.1f} GiB for the backward pass of {micro_batch} "
                            f"x {seqlen} tokens, but only {free / 2**30:.1f} GiB is free; {hint}")
