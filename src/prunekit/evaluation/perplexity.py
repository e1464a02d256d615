"""Perplexity over token windows.

Protocol (see also ``prunekit.data.windows``): every window of L tokens is run independently (positions 0..L-1,
no cache carried between windows, no overlap); its L - 1 next-token predictions are scored with a log-softmax in
fp32 over the full vocabulary, whatever dtype the model runs in; perplexity = exp(sum of NLL / number of scored
tokens). With equal windows this equals exp of the mean of per-window mean NLLs. A non-finite loss is an error,
never skipped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError

# Tokens per forward pass: keeps the fp32 logits of a batch (tokens x vocab x 4 bytes) near 400 MB for a 49k vocab.
DEFAULT_TOKENS_PER_BATCH = 2048


@dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    scored_tokens: int
    windows: int
    seqlen: int
    dtype: str
    bos: str
    source: str
    split: str
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / self.seconds if self.seconds else float("nan")

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "nll_sum": self.nll_sum,
            "scored_tokens": self.scored_tokens,
            "windows": self.windows,
            "seqlen": self.seqlen,
            "dtype": self.dtype,
            "bos": self.bos,
            "source": self.source,
            "split": self.split,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
        }


def default_batch_size(seqlen: int) -> int:
    return max(1, DEFAULT_TOKENS_PER_BATCH // seqlen)


def window_nll_sums(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-window sum of next-token NLL, from logits ``[b, L, V]``, with the log-softmax in fp32.

    The targets are the inputs shifted left, with the last position ignored; scoring the full logits this way
    avoids copying ``logits[:, :-1]`` (400 MB per fp32 batch at a 49k vocabulary).
    """
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return losses.view(targets.shape).sum(dim=1)


def perplexity(
    model: nn.Module, windows: TokenWindows, batch_size: int | None = None, progress: bool = True
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (see the module docstring for the protocol)."""
    from prunekit.models.onloading import onloader_of

    batch_size = batch_size or default_batch_size(windows.seqlen)
    if onloader_of(model) is not None:
        return _onloaded_perplexity(model, windows, batch_size, progress)
    return _in_memory_perplexity(model, windows, batch_size, progress)


@torch.inference_mode()
def _in_memory_perplexity(model: nn.Module, windows: TokenWindows, batch_size: int,
                          progress: bool) -> PerplexityResult:
    parameter = next(model.parameters())
    nll_sum, started = 0.0, time.perf_counter()
    batches = range(0, windows.num_windows, batch_size)
    label = f"ppl {windows.source} L={windows.seqlen}"
    for start in tqdm(batches, desc=label, unit="batch", disable=not progress, leave=False):
        batch = windows.input_ids[start : start + batch_size].to(parameter.device)
        logits = model(input_ids=batch, use_cache=False).logits
        sums = window_nll_sums(logits, batch)
        if not torch.isfinite(sums).all():
            raise PrunekitError(f"non-finite loss in windows {start}..{start + len(batch) - 1}; the model diverged")
        nll_sum += float(sums.double().sum())
    return _result(nll_sum, windows, parameter.dtype, started)


def _result(nll_sum: float, windows: TokenWindows, dtype: torch.dtype, started: float) -> PerplexityResult:
    scored = windows.num_windows * (windows.seqlen - 1)
    return PerplexityResult(
        perplexity=math.exp(nll_sum / scored),
        nll_sum=nll_sum,
        scored_tokens=scored,
        windows=windows.num_windows,
        seqlen=windows.seqlen,
        dtype=str(dtype).removeprefix("torch."),
        bos=windows.bos,
        source=windows.source,
        split=windows.split,
        seconds=time.perf_counter() - started,
    )


@torch.no_grad()  # not inference mode: onloaded tensors must stay editable by the methods that follow
def _onloaded_perplexity(model: nn.Module, windows: TokenWindows, batch_size: int, progress: bool) -> PerplexityResult:
    """The same protocol on a model whose weights are on disk: every window goes through one layer at a time
    (``LayerwiseRunner``), then through the final norm and the head, read last."""
    from prunekit.calibration.branches import head_logits
    from prunekit.calibration.runner import LayerwiseRunner
    from prunekit.models.onloading import onloader_of

    onloader = onloader_of(model)
    nll_sum, started = 0.0, time.perf_counter()
    with LayerwiseRunner(model, onloader.adapter, windows, batch_size=batch_size, progress=progress) as runner:
        for index, _ in runner.layers():
            runner.advance(index)
        dtype = model.get_output_embeddings().weight.dtype
        with onloader.head():
            for rows in runner.batches():
                batch = windows.input_ids[rows]
                logits = head_logits(model, runner.inputs.read(rows))
                sums = window_nll_sums(logits, batch.to(logits.device))
                if not torch.isfinite(sums).all():
                    raise PrunekitError(f"non-finite loss in windows {rows.start}..{rows.stop - 1}; the model "
                                        "diverged")
                nll_sum += float(sums.double().sum())
    return _result(nll_sum, windows, dtype, started)
