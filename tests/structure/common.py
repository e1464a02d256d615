"""Shared pieces of the structure tests: a mixed plan for any head layout, and a masked dense reference."""

from __future__ import annotations

import copy

import torch

from prunekit.models.adapters import ArchAdapter
from prunekit.structure.plan import PruningPlan

SHAPES = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
SHAPE_IDS = ["mha", "gqa", "mqa"]
MIXED_LAYERS = 5


def mixed_plan(adapter: ArchAdapter) -> PruningPlan:
    """Every kind of cut at once, on a 5-layer model (the Gemma3 pattern S F S F S keeps a sliding layer):

    0: attention removed (the KV-cache slot 0 case), half the channels;  1: KV groups pruned (MQA: q-head mode),
    MLP removed;  2: whole layer removed;  3: q-head mode (MHA: heads), channels pruned;  4: attention intact.
    """
    assert adapter.num_layers == MIXED_LAYERS
    n_q, n_kv, g = adapter.num_heads, adapter.num_kv_heads, adapter.heads_per_group
    plan = PruningPlan.keep_all(adapter, method="test", settings={"note": "mixed"}, seed=7)
    plan.remove_attention(0)
    plan.keep_channels(0, range(0, adapter.intermediate_size, 2))
    if n_kv > 1:
        plan.keep_kv_groups(1, range(1, n_kv, 2))  # odd groups
    else:
        plan.keep_heads(1, [1, 3])
    plan.remove_mlp(1)
    plan.remove_layer(2)
    plan.keep_heads(3, [h for h in range(n_q) if h % g == g - 1] if g > 1 else [0, 2])
    plan.keep_channels(3, [5, *range(30, 79)])
    plan.keep_channels(4, range(40, adapter.intermediate_size))
    return plan


@torch.no_grad()
def masked_reference(model: torch.nn.Module, plan: PruningPlan, adapter: ArchAdapter) -> torch.nn.Module:
    """A dense copy that computes what the pruned model should, using only zeros in unchanged modules.

    A query head contributes to the layer output only through its d_h columns of o_proj, and an FFN channel only
    through its column of down_proj, so zeroing those columns removes exactly that unit (whatever q/k/v or
    gate/up compute). A zeroed o_proj / down_proj (and bias) makes a whole branch add zero; Gemma3's post-branch
    RMSNorm maps zero to zero. Shapes, layer count, KV cache and config stay dense, so a slicing, renumbering
    or cache mistake in apply_plan shows up as a difference.
    """
    reference = copy.deepcopy(model)
    dh = adapter.head_dim
    for layer_plan, layer in zip(plan.layers, adapter.decoder_layers(reference), strict=True):
        o_proj = adapter.attention_linears(layer)["o_proj"]
        down = adapter.mlp_linears(layer)["down_proj"]
        for head in range(adapter.num_heads):
            if head not in layer_plan.kept_heads:  # empty when the block or layer is removed
                o_proj.weight[:, head * dh : (head + 1) * dh] = 0
        for channel in range(adapter.intermediate_size):
            if channel not in layer_plan.kept_channels:
                down.weight[:, channel] = 0
        if not layer_plan.has_attention and o_proj.bias is not None:
            o_proj.bias.zero_()
        if not layer_plan.has_mlp and down.bias is not None:
            down.bias.zero_()
    return reference
