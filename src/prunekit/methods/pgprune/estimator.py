"""The REINFORCE step of the released optimiser: baseline, gradient estimate, learning-rate schedule, update.

Spec section 2, steps 2-6. Everything here is fp32 arithmetic on the probabilities; no model is involved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

EPSILON = 1e-7


@dataclass(frozen=True)
class EstimatorSettings:
    estimator: str = "released"  # "released": (m - s) / sqrt(s(1 - s) + eps); "exact": (m - s) / (s(1 - s) + eps)
    baseline: str = "ema"  # "ema" (released) or "leave_one_out"
    window: int = 5  # EMA window W
    polarization: float = 0.0  # lambda of the optional polarisation term


def cosine_rate(initial: float, step: int, steps: int) -> float:
    """η_t = η_0 · ½(1 + cos(π t / S)): cosine to zero, no warm-up."""
    return initial * 0.5 * (1.0 + math.cos(math.pi * step / steps))


def update_baseline(baseline: float | None, mean_loss: float, window: int) -> float:
    """The released EMA, updated with the current step's mean loss before it is used (δ = L̄ at the first step)."""
    if baseline is None:
        return mean_loss
    return (1.0 - 1.0 / window) * baseline + mean_loss / window


def score_function(mask: torch.Tensor, probabilities: torch.Tensor, estimator: str) -> torch.Tensor:
    """(m − s) over s(1 − s) (exact) or over its square root (released; a per-unit preconditioner)."""
    variance = probabilities * (1.0 - probabilities) + EPSILON
    return (mask - probabilities) / (variance if estimator == "exact" else variance.sqrt())


def gradient(losses: Sequence[float], masks: Sequence[Mapping[str, torch.Tensor]],
             probabilities: Mapping[str, torch.Tensor], baseline: float,
             settings: EstimatorSettings) -> dict[str, torch.Tensor]:
    """The estimate of ∇_s E[L] per kind from K ≥ 2 samples (spec step 3).

    EMA: g = 1/(K−1) Σ_j (L_j − δ) · score_j. Leave-one-out: g = 1/K Σ_j (L_j − mean of the others) · score_j,
    which equals 1/(K−1) Σ_j (L_j − L̄) · score_j.
    """
    count = len(losses)
    mean = sum(losses) / count
    if settings.baseline == "leave_one_out":
        advantages = [(loss - mean) / (count - 1) for loss in losses]
    else:
        advantages = [(loss - baseline) / (count - 1) for loss in losses]
    result = {}
    for kind, values in probabilities.items():
        total = torch.zeros_like(values)
        for advantage, mask in zip(advantages, masks, strict=True):
            total += advantage * score_function(mask[kind], values, settings.estimator)
        if settings.polarization:
            total += settings.polarization * (torch.log(1.0 - values + EPSILON) - torch.log(values + EPSILON))
        result[kind] = total
    return result


def finite_samples(losses: Sequence[float], masks: Sequence) -> tuple[list[float], list]:
    """Drop samples whose loss is not finite (spec step 1)."""
    kept = [(loss, mask) for loss, mask in zip(losses, masks, strict=True) if math.isfinite(loss)]
    return [loss for loss, _ in kept], [mask for _, mask in kept]
