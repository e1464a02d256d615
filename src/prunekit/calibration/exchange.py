"""Calibration batches split across torchrun processes, with statistics that come out bit-identical to one
process's.

The windows are cut into the same mini-batches as in one process; batch ``i`` goes to process ``i mod N``. The
statistics of a pass are sums over batches, and a floating-point sum depends on its order, so instead of summing
per process and all-reducing, each round of N batches (one per process) is exchanged and every process folds the
N contributions in batch order, exactly as one process folds its batches one after the other. Cost: a d x d
Gram matrix per linear and batch crosses between the processes (9 MB at SmolLM2's FFN width, 0.8 GB at
Llama-3-8B's), and each process holds N of them during a round.
"""

from __future__ import annotations

import math

import torch

from prunekit.calibration.statistics import BatchPart, InputStatistics
from prunekit.distributed import World, all_gather_tensor
from prunekit.errors import PrunekitError


def batch_share(batches: list[slice], here: World) -> list[slice]:
    """The batches process ``here.rank`` computes: every N-th, from its rank on."""
    if len(batches) < here.size:
        plural = "batch" if len(batches) == 1 else "batches"
        raise PrunekitError(f"{len(batches)} calibration {plural} cannot be split across {here.size} processes; give "
                            "more calibration tokens or a smaller --option batch_size (the same for every run)")
    return batches[here.rank::here.size]


class BatchExchange:
    """The rounds of one pass: round k holds batches k*N .. k*N + N - 1 (the last round may be short)."""

    def __init__(self, batches: int, here: World):
        self.rounds = math.ceil(batches / here.size)

    def gather(self, part: BatchPart | None, statistics: InputStatistics) -> list[BatchPart]:
        """Every process's contribution to this round, in batch order (``None``: this process has no batch in it;
        it sends an empty contribution of the right size)."""
        vectors, device = statistics.part_vectors, statistics.device
        header = [float(part.tokens), float(part.sequences)] if part else [0.0, 0.0]
        empty = torch.zeros(statistics.features, dtype=torch.float64, device=device)
        packed = torch.cat([torch.tensor(header, dtype=torch.float64, device=device)]
                           + [getattr(part, name) if part else empty for name in vectors])
        grams = None
        if statistics.xtx is not None:
            grams = all_gather_tensor(part.gram if part else torch.zeros_like(statistics.xtx))
        gathered = []
        for rank, row in enumerate(all_gather_tensor(packed)):
            fields = {name: row[2 + i * statistics.features:2 + (i + 1) * statistics.features]
                      for i, name in enumerate(vectors)}
            gathered.append(BatchPart(tokens=int(row[0]), sequences=int(row[1]),
                                      gram=grams[rank] if grams else None, **fields))
        return gathered
