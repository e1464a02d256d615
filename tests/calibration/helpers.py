"""Tiny models with sliding-window layers where the family has them, so masks per layer type matter."""

from __future__ import annotations

import torch

from tests.conftest import make_tiny_model

SEQLEN = 24  # longer than every sliding window below (Gemma3's tiny config uses 16)


def sliding_model(family: str, **overrides):
    """``make_tiny_model`` with a sliding window shorter than SEQLEN in every family that supports one."""
    if family == "mistral":
        overrides.setdefault("sliding_window", 8)
    if family in ("qwen2", "qwen3"):
        overrides = {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 1, **overrides}
    return make_tiny_model(family, **overrides)


def token_windows(count: int = 5, seqlen: int = SEQLEN, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (count, seqlen), generator=generator)
