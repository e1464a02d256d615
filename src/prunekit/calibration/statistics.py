"""Per-linear input statistics, accumulated by forward pre-hooks while calibration batches flow through a layer.

The methods need different summaries of the same inputs X (rows = tokens, columns = input features of a linear):

- ``hessian``: the sum of x xᵀ over tokens (SlimGPT's H = 2 X Xᵀ, up to a scale), in fp32;
- ``norms``: the per-feature sum of squares, whose square root is Wanda's ‖X_j‖₂;
- ``moments``: the per-feature mean and unbiased variance (FLAP's fluctuation and bias compensation);
- ``abs_sums``: the per-feature sum of absolute values (LLM-BIP's Σ_t |x_tj|).

Everything is accumulated in fp32 or float64 whatever the model dtype, because a bf16 running sum over 10⁵ tokens
loses every late contribution. Means and variances use Chan's pairwise merge of per-batch (mean, M2) in float64, so
features with a large mean and a small spread keep their variance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunekit.errors import PrunekitError

if TYPE_CHECKING:
    from prunekit.calibration.exchange import BatchExchange

HESSIAN = "hessian"
NORMS = "norms"
MOMENTS = "moments"
ABS_SUMS = "abs_sums"
STATISTIC_KINDS = (HESSIAN, NORMS, MOMENTS, ABS_SUMS)


def check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    """Validate a set of statistic kinds (a typo should fail before an hour of forward passes, not after)."""
    chosen = frozenset(kinds)
    unknown = sorted(chosen - set(STATISTIC_KINDS))
    if unknown:
        raise PrunekitError(f"unknown statistic '{unknown[0]}'; use any of: {', '.join(STATISTIC_KINDS)}")
    if not chosen:
        raise PrunekitError(f"no statistics asked for; use any of: {', '.join(STATISTIC_KINDS)}")
    return chosen


@dataclass
class BatchPart:
    """One batch's contribution to the statistics, before it is folded into the running ones."""

    tokens: int
    sequences: int
    gram: torch.Tensor | None = None  # Σ x xᵀ over the batch, fp32 (only when it travels between processes)
    square_sum: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None


class InputStatistics:
    """Running statistics of the inputs of one linear layer (features = its ``in_features``).

    Each batch's contribution is computed on its own and then folded into the running statistics in batch order.
    Under torchrun (``exchange``), the processes hold interleaved batches; every round they exchange their
    batches' contributions and fold all of them in batch order, so every process ends with exactly the bits one
    process would have (floating-point sums depend on their order; this keeps the order).
    """

    def __init__(self, features: int, kinds: Iterable[str] = (HESSIAN,), device: torch.device | str = "cpu",
                 exchange: BatchExchange | None = None):
        self.features = features
        self.kinds = check_kinds(kinds)
        self.tokens = 0
        self.sequences = 0
        self.device = torch.device(device)
        self.exchange = exchange
        self._rounds = 0
        wants = self.kinds.__contains__
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device) if wants(HESSIAN) else None
        self.square_sum = torch.zeros(features, dtype=torch.float64, device=device) if wants(NORMS) else None
        self._mean = torch.zeros(features, dtype=torch.float64, device=device) if wants(MOMENTS) else None
        self._m2 = torch.zeros(features, dtype=torch.float64, device=device) if wants(MOMENTS) else None
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device) if wants(ABS_SUMS) else None

    @property
    def part_vectors(self) -> tuple[str, ...]:
        """The per-feature float64 fields of a :class:`BatchPart` these statistics use, in a fixed order."""
        held = {"square_sum": self.square_sum, "mean": self._mean, "m2": self._m2, "abs_sum": self.abs_sum}
        return tuple(name for name, tensor in held.items() if tensor is not None)

    @torch.no_grad()
    def update(self, inputs: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., features]``; a leading batch dimension counts as sequences."""
        if inputs.shape[-1] != self.features:
            raise PrunekitError(f"input has {inputs.shape[-1]} features, statistics were set up for {self.features}")
        x = inputs.reshape(-1, self.features).float()
        sequences = int(inputs.shape[0]) if inputs.dim() > 2 else 1
        if self.exchange is None:
            if x.shape[0]:
                if self.xtx is not None:
                    _add_gram(self.xtx, x)  # straight into the running sum
                self._fold(self._part(x, sequences))
            return
        part = self._part(x, sequences)
        if self.xtx is not None:
            part.gram = _add_gram(torch.zeros_like(self.xtx), x)
        self._exchange_round(part)

    def finish(self) -> None:
        """Complete the statistics after the last batch: under torchrun, take part in the rounds this process had
        no batch for, so that every process holds the statistics of all windows."""
        while self.exchange is not None and self._rounds < self.exchange.rounds:
            self._exchange_round(None)

    def _exchange_round(self, part: BatchPart | None) -> None:
        for gathered in self.exchange.gather(part, self):
            if self.xtx is not None and gathered.tokens:
                self.xtx += gathered.gram
            self._fold(gathered)
        self._rounds += 1

    def _part(self, x: torch.Tensor, sequences: int) -> BatchPart:
        part = BatchPart(tokens=x.shape[0], sequences=sequences)
        if self.square_sum is not None:
            part.square_sum = (x * x).sum(dim=0, dtype=torch.float64)
        if self._mean is not None:
            part.mean = x.mean(dim=0, dtype=torch.float64)
            part.m2 = self._centred_squares(x, part.mean)
        if self.abs_sum is not None:
            part.abs_sum = x.abs().sum(dim=0, dtype=torch.float64)
        return part

    def _fold(self, part: BatchPart) -> None:
        """Fold one batch's vectors and counts into the running statistics (the Gram matrix is added by the
        caller). Means and variances: Chan et al.'s merge of (count, mean, M2) in float64."""
        if part.tokens == 0:
            return
        if self.square_sum is not None:
            self.square_sum += part.square_sum
        if self._mean is not None:
            total = self.tokens + part.tokens
            delta = part.mean - self._mean
            self._mean += delta * (part.tokens / total)
            self._m2 += part.m2 + delta * delta * (self.tokens * part.tokens / total)
        if self.abs_sum is not None:
            self.abs_sum += part.abs_sum
        self.tokens += part.tokens
        self.sequences += part.sequences

    @staticmethod
    def _centred_squares(x: torch.Tensor, mean: torch.Tensor, elements: int = 1 << 24) -> torch.Tensor:
        """Σ (x - mean)² per feature in float64, in row chunks so a large batch is never copied whole to float64."""
        total = torch.zeros_like(mean)
        for part in x.split(max(1, elements // x.shape[1])):
            total += ((part.double() - mean) ** 2).sum(dim=0)
        return total

    # -- results -------------------------------------------------------------------------------------------
    def hessian(self, per: str = "token", factor: float = 2.0) -> torch.Tensor:
        """``factor · Σ x xᵀ / count`` in fp32, count = tokens (``per="token"``) or sequences (SlimGPT's running mean).

        Any positive scale gives the same OBS solution, since SlimGPT damps relative to the mean diagonal; the
        choice only matters when comparing Hessians across runs with different window lengths.
        """
        return self.gram() * self._hessian_scale(per, factor)

    def take_hessian(self, per: str = "token", factor: float = 2.0) -> torch.Tensor:
        """:meth:`hessian`, scaled in place and handed over: the statistics no longer hold it (one d x d matrix
        alive instead of two, which matters at an 8B model's FFN width)."""
        xtx, scale = self.gram(), self._hessian_scale(per, factor)
        self.xtx = None
        return xtx.mul_(scale)

    def gram(self) -> torch.Tensor:
        """Σ x xᵀ over all tokens, fp32: the accumulated upper triangle, mirrored into the lower one in place."""
        return _mirror_upper(self._require(self.xtx, HESSIAN))

    def _hessian_scale(self, per: str, factor: float) -> float:
        counts = {"token": self.tokens, "sequence": self.sequences}
        if per not in counts:
            raise PrunekitError(f"unknown Hessian normalisation '{per}'; use token or sequence")
        return factor / max(counts[per], 1)

    def feature_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens, per input feature (Wanda), fp32."""
        return self._require(self.square_sum, NORMS).sqrt().float()

    def absolute_sums(self) -> torch.Tensor:
        """Σ over all tokens of |x_j|, per input feature (LLM-BIP), float64."""
        return self._require(self.abs_sum, ABS_SUMS)

    def mean(self) -> torch.Tensor:
        """Mean of each input feature over all tokens (FLAP bias compensation), fp32."""
        return self._require(self._mean, MOMENTS).float()

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance of each input feature over all tokens (FLAP's fluctuation), fp32."""
        m2 = self._require(self._m2, MOMENTS)
        if self.tokens < 2:
            raise PrunekitError(f"the variance needs at least 2 tokens, only {self.tokens} were seen")
        return (m2 / (self.tokens - 1)).float()

    def _require(self, value: torch.Tensor | None, kind: str) -> torch.Tensor:
        if value is None:
            raise PrunekitError(f"'{kind}' statistics were not collected; add '{kind}' to kinds")
        if self.tokens == 0:
            raise PrunekitError("no inputs were seen by this linear; was its branch run (or removed)?")
        return value

    def __repr__(self) -> str:
        return f"InputStatistics(features={self.features}, kinds={sorted(self.kinds)}, tokens={self.tokens})"


def _gram_blocks(features: int) -> list[slice]:
    """Row blocks of the Gram matrix (fixed by the width alone, so every process computes the same bits); about
    4 M elements each, so no second d x d matrix ever exists."""
    rows = max(1, (1 << 22) // features)
    return [slice(start, min(start + rows, features)) for start in range(0, features, rows)]


def _add_gram(target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``target += xᵀ x`` on and above the diagonal blocks only: the matrix is symmetric, so half the products
    suffice; :func:`_mirror_upper` fills the rest when the matrix is read."""
    for rows in _gram_blocks(x.shape[1]):
        target[rows, rows.start:] += x[:, rows].T @ x[:, rows.start:]
    return target


def _mirror_upper(matrix: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of ``matrix`` onto its lower one, in place, a block at a time."""
    for rows in _gram_blocks(matrix.shape[0]):
        diagonal = matrix[rows, rows]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        matrix[rows.stop:, rows] = matrix[rows, rows.stop:].T
    return matrix


@contextmanager
def input_statistics(
    linears: Mapping[str, nn.Module], kinds: Iterable[str] = (HESSIAN,), exchange: BatchExchange | None = None
) -> Iterator[dict[str, InputStatistics]]:
    """Hook ``linears`` for the duration of the block; yields their statistics by name, hooks removed on exit.

    The statistics live on each linear's weight device, so accumulation never copies activations to the host.
    """
    chosen = check_kinds(kinds)
    statistics: dict[str, InputStatistics] = {}
    handles = []
    try:
        for name, linear in linears.items():
            weight = getattr(linear, "weight", None)
            if weight is None or weight.dim() != 2:
                raise PrunekitError(f"'{name}' is not a linear layer with a 2-d weight; cannot hook its inputs")
            statistics[name] = InputStatistics(weight.shape[1], chosen, weight.device, exchange)
            handles.append(linear.register_forward_pre_hook(_hook(statistics[name]), with_kwargs=True))
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def _hook(target: InputStatistics):
    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        target.update(args[0] if args else kwargs["input"])

    return record
