"""The policy of a policy-gradient run: keep-probabilities per unit, masks drawn from them, the projection onto
the keep budget, the initial map from scores, and the final exact top-k choice.

Probabilities are stored as they are used (no logit): ``attention`` ``[L, a]`` (KV groups, or query heads of a
one-KV-head model), ``channels`` ``[L, d_ff]`` and, with layer units, ``layers`` ``[L]``; all fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from prunekit.methods.pgprune.budget import Budgets

WIDTH_KINDS = ("attention", "channels")
ALL_KINDS = ("attention", "channels", "layers")
PROJECTION_HALVINGS, PROJECTION_TOLERANCE = 20, 1e-3


def project(values: torch.Tensor, budget: float) -> torch.Tensor:
    """``clamp(values − v, 0, 1)`` with the smallest v ≥ 0 whose sum is at most ``budget`` (spec section 2).

    Bisection on [0, max] with at most 20 halvings and a tolerance of 1e-3 on the sum, as released. Departure: the
    released code returns the midpoint of the last bracket, whose sum can sit a little above the budget; this
    returns its upper end, so the inequality always holds (the final top-k makes the count exact either way).
    """
    clamped = values.clamp(0.0, 1.0)
    if float(clamped.sum()) <= budget:
        return clamped
    low, high = 0.0, float(values.max())
    for _ in range(PROJECTION_HALVINGS):
        middle = (low + high) / 2
        total = float((values - middle).clamp(0.0, 1.0).sum())
        if total > budget:
            low = middle
        else:
            high = middle
            if budget - total <= PROJECTION_TOLERANCE:
                break
    return (values - high).clamp(0.0, 1.0)


def sigmoid_map(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """The released ``sigmap`` init, row by row: z-score, sigmoid, shift to mean ``keep_fraction``, clamp."""
    scores = scores.double()
    spread = scores.std(dim=-1, keepdim=True)
    z = torch.where(spread > 0, (scores - scores.mean(dim=-1, keepdim=True)) / spread.clamp_min(1e-30),
                    torch.zeros_like(scores))
    probabilities = torch.sigmoid(z)
    probabilities = probabilities - probabilities.mean(dim=-1, keepdim=True) + keep_fraction
    return probabilities.clamp(0.0, 1.0).float()


@dataclass
class Policy:
    """Keep-probabilities and the learning budgets they are projected onto after every step."""

    probabilities: dict[str, torch.Tensor]
    budgets: Budgets
    scope: str = "global"  # "global": one budget per type over all layers; "layer": one per layer and type

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind for kind in ALL_KINDS if kind in self.probabilities)

    def keep_fraction(self, kind: str) -> float:
        return {"attention": self.budgets.attention_fraction, "channels": self.budgets.channel_fraction,
                "layers": self.budgets.layer_fraction}[kind]

    def sample(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One mask: m_u = 1 if U(0, 1) < s_u, drawn kind by kind in a fixed order (reproducible per seed)."""
        return {kind: (torch.rand(values.shape, generator=generator) < values).float()
                for kind, values in self.probabilities.items()}

    def project(self) -> None:
        """Project every kind onto its budget (layers always globally: the layer budget is a count of layers)."""
        for kind, values in self.probabilities.items():
            fraction = self.keep_fraction(kind)
            if self.scope == "layer" and kind != "layers":
                rows = [project(row, fraction * row.numel()) for row in values]
                self.probabilities[kind] = torch.stack(rows)
            else:
                self.probabilities[kind] = project(values.flatten(), fraction * values.numel()).view_as(values)

    def expected_fractions(self) -> dict[str, float]:
        return {kind: float(values.mean()) for kind, values in self.probabilities.items()}

    def final_masks(self, tie_scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The binary masks of the final plan: exactly the budgeted counts (see :func:`top_k`)."""
        budgets = self.budgets
        layers = torch.ones(budgets.num_layers)
        if "layers" in self.probabilities:
            layers = top_k(self.probabilities["layers"][:, None], tie_scores["layers"][:, None],
                           budgets.kept_layers, floor=0)[:, 0]
        attention = top_k(self.probabilities["attention"], tie_scores["attention"], budgets.kept_attention,
                          floor=1, rows=layers.bool())
        channels = top_k(self.probabilities["channels"], tie_scores["channels"], budgets.kept_channels, floor=1,
                         rows=layers.bool())
        masks = {"attention": attention, "channels": channels}
        if "layers" in self.probabilities:
            masks["layers"] = layers
        return masks


def top_k(probabilities: torch.Tensor, tie_scores: torch.Tensor, count: int, floor: int,
          rows: torch.Tensor | None = None) -> torch.Tensor:
    """A 0/1 mask ``[L, n]`` keeping exactly ``count`` units of the allowed ``rows``: each allowed row's best
    ``floor`` units first (the per-layer guard), then the rest by rank. Rank: higher probability, then higher
    tie score (the init score), then lower layer, then lower index; so equal probabilities never overshoot the
    count, as the released threshold rule (keep every s at or above the k-th value) can.

    Forcing a row's best unit in and filling the rest by rank is the spec's guard (force a unit back in, drop the
    lowest-ranked kept unit elsewhere) done in one pass.
    """
    layers, width = probabilities.shape
    allowed = torch.ones(layers, dtype=torch.bool) if rows is None else rows
    if count < floor * int(allowed.sum()) or count > width * int(allowed.sum()):
        raise ValueError(f"cannot keep {count} units in {int(allowed.sum())} rows of {width} with a floor of {floor}")
    flat_p, flat_tie = probabilities.flatten().double().tolist(), tie_scores.flatten().double().tolist()
    order = sorted(range(layers * width), key=lambda unit: (-flat_p[unit], -flat_tie[unit], unit))
    keep = torch.zeros(layers * width)
    per_row = [0] * layers
    for unit in order:  # the guard: each allowed row's best `floor` units
        row = unit // width
        if allowed[row] and per_row[row] < floor:
            keep[unit], per_row[row] = 1.0, per_row[row] + 1
    left = count - int(keep.sum())
    for unit in order:
        if left == 0:
            break
        if allowed[unit // width] and not keep[unit]:
            keep[unit], left = 1.0, left - 1
    return keep.view(layers, width)
