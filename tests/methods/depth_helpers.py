"""Tiny models on which a depth search behaves like on a real LM.

A randomly initialised tiny model is almost uniform on any text, so every candidate block scores about the same and
early abandon never triggers. Sharpening its (untied) head and calibrating on text sampled from the model itself
makes the dense model confident and right on that text, and removing a block costs anything from nothing to a lot,
as in a trained LM.
"""

from __future__ import annotations

import torch

from prunekit.data.windows import TokenWindows
from prunekit.methods import Target, method_info
from tests.conftest import make_tiny_model

SEQLEN = 20  # longer than Gemma3's tiny sliding window (16), so local and global masks both matter


def peaked_model(family: str = "llama", layers: int = 3, scale: float = 30.0, seed: int = 0, **overrides):
    """``make_tiny_model`` with an untied head scaled by ``scale``."""
    model = make_tiny_model(family, layers=layers, seed=seed, tie_word_embeddings=False, **overrides)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@torch.no_grad()
def sampled_windows(model, count: int = 8, seqlen: int = SEQLEN, seed: int = 0) -> TokenWindows:
    """``count`` windows sampled from ``model`` itself (temperature 1), from random first tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (count, 1), generator=generator)
    for _ in range(seqlen - 1):
        probabilities = torch.softmax(model(input_ids=ids).logits[:, -1].float(), dim=-1)
        ids = torch.cat([ids, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
    return TokenWindows(ids, "sampled", "all", seqlen, "none", "sequential", None, ids.numel())


def run_method(name: str, model, windows, target=None, blocks=None, **options):
    """Run a registered method on ``model`` (its defaults under ``options``); returns (plan, artifacts)."""
    target = Target(blocks=blocks) if blocks is not None else target or Target()
    result = method_info(name).apply_to(model, target, windows, progress=False, **options)
    return result.plan, result.artifacts


def schedule_of(name: str, model, windows, target=None, **options) -> dict:
    _, artifacts = run_method(name, model, windows, target, **options)
    return artifacts[f"{name}_schedule.json"]
