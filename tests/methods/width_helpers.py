"""Direct computations the width-method tests compare against: inputs captured from a plain forward, and loops over
units written from the definitions (no prunekit calibration machinery)."""

from __future__ import annotations

import torch

from prunekit.structure.masks import MaskedForward, UnitMask


def windows(count: int = 6, length: int = 24, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (count, length), generator=generator)


@torch.no_grad()
def captured_inputs(model, adapter, input_ids, plan=None) -> list[dict[str, torch.Tensor]]:
    """Per layer, every token's input of o_proj and down_proj ``[tokens, features]`` from one full forward (of the
    model masked by ``plan`` when given)."""
    captured: list[dict[str, list]] = [{"o_proj": [], "down_proj": []} for _ in range(adapter.num_layers)]
    handles = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name, linear in (("o_proj", adapter.attention_linears(layer)["o_proj"]),
                             ("down_proj", adapter.mlp_linears(layer)["down_proj"])):
            def hook(_module, args, store=captured[index][name]):
                store.append(args[0].reshape(-1, args[0].shape[-1]).double().clone())
            handles.append(linear.register_forward_pre_hook(hook))
    try:
        mask = UnitMask.from_plan(plan) if plan is not None else None
        with MaskedForward(model, adapter, mask):
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return [{name: torch.cat(parts) for name, parts in layer.items()} for layer in captured]


def lowest(scores, count: int) -> list[int]:
    values = [float(value) for value in scores]
    return sorted(sorted(range(len(values)), key=lambda unit: (values[unit], unit))[:count])


def removed(kept, total: int) -> list[int]:
    return sorted(set(range(total)) - set(kept))
