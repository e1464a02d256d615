"""Stand-ins for removed sub-blocks.

A removed attention or MLP sub-block is replaced by a module that returns zeros, and the norms on its branch by
``nn.Identity``. Returning zeros (rather than rewriting each family's decoder-layer forward) keeps the stock
transformers layer code: the residual add of a zero branch leaves the stream untouched, and a post-branch norm
that we did not replace would still map zero to zero (RMSNorm(0) = 0). The attention stand-in never touches the
KV cache; materialisation marks its cache slot as a placeholder (see ``prunekit.structure.materialize``).
"""

from __future__ import annotations

import torch
from torch import nn


class RemovedAttention(nn.Module):
    """A removed attention sub-block: contributes nothing and stores nothing in the KV cache."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        # Decoder layers unpack ``(attn_output, attn_weights)``; a shape-true zero keeps hooks and adds simple.
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return "removed"


class RemovedMLP(nn.Module):
    """A removed MLP sub-block: contributes nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)

    def extra_repr(self) -> str:
        return "removed"


def is_removed(module: nn.Module) -> bool:
    """Whether a layer's attention or MLP slot holds a removed-block stand-in."""
    return isinstance(module, (RemovedAttention, RemovedMLP))
