"""A decoder layer as two residual branches, run separately.

Every supported family computes ``h' = h + post_attn(attn(pre_attn(h)))`` and then ``out = h' + post_mlp(mlp(
pre_mlp(h')))``, where the post-branch norms exist only in Gemma3. Running the branches one at a time lets
BlockPruner and SLEB start a candidate from a cached residual in the middle of a layer, and lets SlimGPT reuse the
post-attention residual of its MLP-statistics pass. The norms come from the adapter *by role* (first = pre-branch
norm, second = post-branch norm), the same ops run in the same order as the stock layer forward, so the result is
bit-identical to ``layer(hidden, **kwargs)``. A removed branch (a ``RemovedAttention`` / ``RemovedMLP`` stand-in)
contributes exactly zero, so it is skipped without running anything.

In every supported family each branch ends in one linear (``o_proj``, ``down_proj``) whose output is the branch
output before the post-norm. :func:`replay_branch` uses that: given the inputs that linear saw, it recomputes the
branch output with the linear's *current* weights, bit-identically to a rerun when nothing else changed, at the
cost of one matmul. SlimGPT prunes and compensates exactly that linear, so it never reruns a branch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.blocks import is_removed


@dataclass(frozen=True)
class LayerContext:
    """The keyword arguments the model passes to one decoder layer for one batch size, besides hidden states.

    They hold the rotary ``position_embeddings`` (Gemma3: local or global, by layer type), the causal or
    sliding-window ``attention_mask`` of the layer's type, ``position_ids`` and a ``None`` KV cache.
    """

    kwargs: Mapping[str, Any] = field(default_factory=dict)
    layer_type: str | None = None

    def on(self, device: torch.device) -> LayerContext:
        """The same context with its tensors on ``device`` (no copy when they are already there)."""
        return LayerContext({key: _to_device(value, device) for key, value in self.kwargs.items()}, self.layer_type)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    return value


BRANCHES = ("attention", "mlp")
OUTPUT_LINEARS = {"attention": "o_proj", "mlp": "down_proj"}


def check_branch(branch: str) -> str:
    if branch not in BRANCHES:
        raise PrunekitError(f"unknown branch '{branch}'; use attention or mlp")
    return branch


def branch_module(adapter: ArchAdapter, layer: nn.Module, branch: str) -> nn.Module:
    """The attention or MLP module of ``layer``."""
    return adapter.attention(layer) if check_branch(branch) == "attention" else adapter.mlp(layer)


def output_linear(adapter: ArchAdapter, layer: nn.Module, branch: str) -> nn.Linear:
    """The last linear of a branch (``o_proj`` / ``down_proj``); its output is the branch output before post-norm."""
    module = branch_module(adapter, layer, branch)
    if is_removed(module):
        raise PrunekitError(f"the {branch} block of this layer was removed; it has no output linear")
    return getattr(module, OUTPUT_LINEARS[branch])


def branch_norms(adapter: ArchAdapter, layer: nn.Module, branch: str) -> tuple[nn.Module, nn.Module | None]:
    """The pre-norm and the optional post-norm (Gemma3) of a branch."""
    attention = check_branch(branch) == "attention"
    norms = adapter.attention_norm_modules(layer) if attention else adapter.mlp_norm_modules(layer)
    modules = list(norms.values())
    if not 1 <= len(modules) <= 2:
        label = "attention" if attention else "MLP"
        raise PrunekitError(
            f"the {label} branch has {len(modules)} norms; expected a pre-norm "
            "and at most one post-norm"
        )
    return modules[0], modules[1] if len(modules) == 2 else None


def _add_output(hidden: torch.Tensor, output: torch.Tensor, post: nn.Module | None) -> torch.Tensor:
    """The residual stream after a branch: ``hidden`` plus its (post-normed) output."""
    if post is not None:
        output = post(output)
    return hidden + output


def attention_branch(
    adapter: ArchAdapter, layer: nn.Module, hidden: torch.Tensor, context: LayerContext
) -> torch.Tensor:
    """``hidden`` plus the attention branch of ``layer``: the residual stream entering the MLP branch.

    Returns ``hidden`` itself when the attention block was removed.
    """
    attention = adapter.attention(layer)
    if is_removed(attention):
        return hidden
    pre, post = branch_norms(adapter, layer, "attention")
    output, _ = attention(hidden_states=pre(hidden), **context.kwargs)
    return _add_output(hidden, output, post)


def mlp_branch(adapter: ArchAdapter, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` plus the MLP branch of ``layer``: the layer's output. Returns ``hidden`` if the MLP was removed."""
    mlp = adapter.mlp(layer)
    if is_removed(mlp):
        return hidden
    pre, post = branch_norms(adapter, layer, "mlp")
    return _add_output(hidden, mlp(pre(hidden)), post)


def run_branch(
    adapter: ArchAdapter, layer: nn.Module, branch: str, hidden: torch.Tensor, context: LayerContext
) -> torch.Tensor:
    """``hidden`` plus the output of one branch (``context`` is used by attention only)."""
    if check_branch(branch) == "attention":
        return attention_branch(adapter, layer, hidden, context)
    return mlp_branch(adapter, layer, hidden)


def replay_branch(
    adapter: ArchAdapter, layer: nn.Module, branch: str, hidden: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """``hidden`` plus the branch output recomputed from ``features``, the inputs its output linear saw."""
    _, post = branch_norms(adapter, layer, branch)
    return _add_output(hidden, output_linear(adapter, layer, branch)(features), post)


def layer_forward(
    adapter: ArchAdapter, layer: nn.Module, hidden: torch.Tensor, context: LayerContext
) -> torch.Tensor:
    """The whole layer as its two branches (equal to the stock forward; skips removed branches for free)."""
    return mlp_branch(adapter, layer, attention_branch(adapter, layer, hidden, context))


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the residual stream after the last layer: final norm, LM head, Gemma's logit soft-capping.

    Mirrors the tail of ``*ForCausalLM.forward`` so a layer-by-layer run can be scored without a full forward.
    """
    return softcap_logits(model, model.get_output_embeddings()(model.model.norm(hidden)))


def softcap_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Gemma's final logit soft-capping where the config asks for it (monotone and 1-Lipschitz)."""
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap
