"""Speed and memory of a model: prefill and decode throughput, parameters, weight bytes, KV cache, peak memory.

What is measured, and why this way:

- **Prefill** runs ``batch x seqlen`` random token ids through the model with ``use_cache=True`` and
  ``logits_to_keep=1``, as generation's first step does: the cache is written, and only the last position's logits
  are computed. Throughput is ``batch * seqlen / seconds``.
- **Decode** prefills a prompt of ``decode_prompt`` tokens (batch 1, untimed), then times ``decode_tokens`` greedy
  steps of one token each, reusing the KV cache. It never stops at EOS: every run does exactly the same work.
  Positions are passed explicitly, so a model whose first layer keeps no cache still decodes at the right positions.
- **Timing**: ``warmup`` untimed runs, then ``repeats`` timed ones; each result reports the median and the spread
  (min, max, and the interquartile range) of per-run tokens/s. Torch's thread settings are left alone and recorded.
- **Peak memory**: growth during each workload (``prunekit.evaluation.memory``), named in ``memory_method``.
- **KV bytes per token** comes from a real cache object after a forward of ``batch x tokens`` with
  ``use_cache=True``: the bytes of every key/value tensor it holds, divided by ``batch * tokens``. Layers that hold
  nothing (pruned attention) contribute nothing. A sliding-window layer caps what it holds, so this is measured at
  a stated length.
- **Parameters** count each tensor once (tied embeddings count once); **weight bytes** likewise.

Formatting lives in ``prunekit.report.speed``; the machine description in ``prunekit.evaluation.machine``.
"""

from __future__ import annotations

import inspect
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluation.machine import machine_info
from prunekit.evaluation.memory import PeakMemory, peak_memory_method
from prunekit.models.adapters import parameter_bytes, unique_parameter_count

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 128), (1, 512), (4, 512))
DEFAULT_DECODE_TOKENS = 64
DEFAULT_DECODE_PROMPT = 128
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 1
KV_PROBE_TOKENS = 32


@dataclass
class Spread:
    """Median and spread of repeated measurements; the median resists one run disturbed by the machine."""

    median: float
    minimum: float
    maximum: float
    q1: float
    q3: float
    runs: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), ordered[0], ordered[-1], q1, q3, list(values))


@dataclass
class PrefillResult:
    batch: int
    seqlen: int
    tokens_per_second: Spread
    peak_memory_bytes: int | None

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.seqlen}"


@dataclass
class DecodeResult:
    prompt_tokens: int
    new_tokens: int
    tokens_per_second: Spread
    peak_memory_bytes: int | None


@dataclass
class SpeedResult:
    """One model's measurements; ``to_dict`` gives the JSON form."""

    model: str
    dtype: str
    device: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: float
    prefill: list[PrefillResult]
    decode: DecodeResult | None
    memory_method: str
    repeats: int
    warmup: int
    machine: dict = field(default_factory=dict)

    @property
    def peak_memory_bytes(self) -> int | None:
        """The largest peak over all workloads."""
        workloads = [*self.prefill, *([self.decode] if self.decode else [])]
        peaks = [w.peak_memory_bytes for w in workloads if w.peak_memory_bytes is not None]
        return max(peaks) if peaks else None

    def to_dict(self) -> dict:
        result = asdict(self)
        result["peak_memory_bytes"] = self.peak_memory_bytes
        return result


# -- parsing --------------------------------------------------------------------------------------------------

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x128,4x512"`` to ``[(1, 128), (4, 512)]``; a one-line error names the bad item."""
    if not text or not text.strip():
        raise PrunekitError("--shapes is empty; give BATCHxLENGTH items separated by commas, e.g. 1x128,4x512")
    shapes = []
    for item in text.split(","):
        match = _SHAPE.match(item)
        if not match:
            raise PrunekitError(f"--shapes item '{item.strip()}' is not BATCHxLENGTH (e.g. 1x128,4x512)")
        batch, length = int(match.group(1)), int(match.group(2))
        if batch < 1 or length < 1:
            raise PrunekitError(f"--shapes item '{item.strip()}' needs a batch and a length of at least 1")
        shapes.append((batch, length))
    return shapes


# -- KV cache -------------------------------------------------------------------------------------------------


def _cache_tensors(cache: object) -> Iterable[torch.Tensor]:
    """Key/value tensors of a transformers Cache (``.layers``) or a legacy tuple of (key, value) pairs."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    yield tensor
        return
    if isinstance(cache, torch.Tensor):
        yield cache
    elif isinstance(cache, (tuple, list)):
        for item in cache:
            if item is not None:
                yield from _cache_tensors(item)


def kv_cache_bytes(cache: object) -> int:
    """Bytes held by the key/value tensors of ``cache``; empty or missing layers count zero, shared ones once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _cache_tensors(cache):
        key = (tensor.data_ptr(), tensor.numel())
        if tensor.numel() and key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_input_embeddings().num_embeddings)


def _random_ids(model: nn.Module, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Seeded random ids: the content does not change the work a dense transformer does."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return torch.randint(0, _vocab_size(model), (batch, length), generator=generator).to(device)


@torch.inference_mode()
def kv_cache_bytes_per_token(model: nn.Module, tokens: int = KV_PROBE_TOKENS, batch: int = 1) -> float:
    """KV-cache bytes per token, measured from the cache a real forward with ``use_cache=True`` builds."""
    output = model(input_ids=_random_ids(model, batch, tokens), use_cache=True)
    cache = _returned_cache(output)
    if cache is None:
        raise PrunekitError("the model returned no KV cache with use_cache=True; cannot measure KV bytes per token")
    return kv_cache_bytes(cache) / (batch * tokens)


# -- timing ---------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_runs(run: Callable[[], float], warmup: int, repeats: int) -> list[float]:
    """``run`` returns its own elapsed seconds, so untimed set-up (e.g. a decode prompt) stays out."""
    for _ in range(warmup):
        run()
    return [run() for _ in range(repeats)]


def _forward_kwargs(model: nn.Module) -> dict:
    """``logits_to_keep=1`` where the model takes it: prefill needs only the last position's logits."""
    parameters = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}


def _cache_keyword(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use the name the model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output) -> object:
    if "cache" in output:  # transformers >= 5.2x; reading past_key_values there warns
        return output["cache"]
    return getattr(output, "past_key_values", None)


def _check_length(model: nn.Module, length: int, what: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and length > limit:
        raise PrunekitError(f"{what} of {length} tokens exceeds the model's context of {limit}")


@torch.inference_mode()
def prefill_throughput(
    model: nn.Module, batch: int, seqlen: int, repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP
) -> PrefillResult:
    """Prefill tokens/s at one ``batch x seqlen`` shape (see the module docstring)."""
    _check_length(model, seqlen, f"prefill shape {batch}x{seqlen}")
    device = next(model.parameters()).device
    ids, extra = _random_ids(model, batch, seqlen), _forward_kwargs(model)

    def run() -> float:
        _synchronize(device)
        started = time.perf_counter()
        model(input_ids=ids, use_cache=True, **extra)
        _synchronize(device)
        return time.perf_counter() - started

    with PeakMemory(device) as memory:
        seconds = _timed_runs(run, warmup, repeats)
    tokens = batch * seqlen
    return PrefillResult(batch, seqlen, Spread.of([tokens / s for s in seconds]), memory.bytes)


def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens after ``prompt`` with a KV cache, exactly ``new_tokens`` of them; returns (ids, seconds).

    Only the decode steps are timed. EOS is ignored on purpose, so every run does the same amount of work.
    """
    device, extra = prompt.device, _forward_kwargs(model)
    batch, length = prompt.shape
    with torch.inference_mode():
        output = model(input_ids=prompt, use_cache=True, **extra)
        cache, token = _returned_cache(output), output.logits[:, -1].argmax(-1, keepdim=True)
        generated = [token]
        keyword = _cache_keyword(model)
        _synchronize(device)
        started = time.perf_counter()
        for step in range(new_tokens - 1):
            position = torch.full((batch, 1), length + step, dtype=torch.long, device=device)
            output = model(input_ids=token, position_ids=position, use_cache=True, **{keyword: cache}, **extra)
            cache, token = _returned_cache(output), output.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
        _synchronize(device)
        seconds = time.perf_counter() - started
    return torch.cat(generated, dim=1), seconds


def decode_throughput(
    model: nn.Module,
    new_tokens: int = DEFAULT_DECODE_TOKENS,
    prompt_tokens: int = DEFAULT_DECODE_PROMPT,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
) -> DecodeResult:
    """Decode tokens/s at batch 1: the first new token comes from the (untimed) prefill, the rest are timed steps."""
    if new_tokens < 2:
        raise PrunekitError(
            "--decode-tokens must be at least 2 (one prefill token plus "
            f"timed steps), got {new_tokens}"
        )
    _check_length(model, prompt_tokens + new_tokens, "decode prompt plus new tokens")
    device, prompt = next(model.parameters()).device, _random_ids(model, 1, prompt_tokens, seed=1)
    with PeakMemory(device) as memory:
        seconds = _timed_runs(lambda: greedy_decode(model, prompt, new_tokens)[1], warmup, repeats)
    timed_steps = new_tokens - 1
    return DecodeResult(prompt_tokens, new_tokens, Spread.of([timed_steps / s for s in seconds]), memory.bytes)


def _check_counts(repeats: int, warmup: int) -> None:
    if repeats < 1:
        raise PrunekitError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise PrunekitError(f"warm-up runs cannot be negative, got {warmup}")


def benchmark_speed(
    model: nn.Module,
    shapes: Sequence[tuple[int, int]] = DEFAULT_SHAPES,
    decode_tokens: int | None = DEFAULT_DECODE_TOKENS,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    label: str = "model",
    decode_prompt: int = DEFAULT_DECODE_PROMPT,
) -> SpeedResult:
    """All measurements for one model; ``decode_tokens=None`` (or 0) skips decode."""
    _check_counts(repeats, warmup)
    parameter = next(model.parameters())
    # First, as its forward also makes weights that are lazily mapped from the file resident; otherwise the first
    # workload's peak memory would count them.
    kv_bytes = kv_cache_bytes_per_token(model)
    prefill = [prefill_throughput(model, b, n, repeats, warmup) for b, n in shapes]
    decode = decode_throughput(model, decode_tokens, decode_prompt, repeats, warmup) if decode_tokens else None
    return SpeedResult(
        model=label,
        dtype=str(parameter.dtype).removeprefix("torch."),
        device=str(parameter.device),
        parameters=unique_parameter_count(model),
        weight_bytes=parameter_bytes(model),
        kv_bytes_per_token=kv_bytes,
        prefill=prefill,
        decode=decode,
        memory_method=peak_memory_method(parameter.device),
        repeats=repeats,
        warmup=warmup,
        machine=machine_info(parameter.device),
    )


def ratio_or_none(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def compare_speed(candidate: SpeedResult, baseline: SpeedResult) -> dict:
    """``candidate / baseline`` for every shared measurement (e.g. pruned / dense); medians for throughput."""
    base_prefill = {r.shape: r for r in baseline.prefill}
    ratios: dict = {
        "parameters": ratio_or_none(candidate.parameters, baseline.parameters),
        "weight_bytes": ratio_or_none(candidate.weight_bytes, baseline.weight_bytes),
        "kv_bytes_per_token": ratio_or_none(candidate.kv_bytes_per_token, baseline.kv_bytes_per_token),
        "peak_memory_bytes": ratio_or_none(candidate.peak_memory_bytes, baseline.peak_memory_bytes),
        "prefill_tokens_per_second": {
            r.shape: ratio_or_none(r.tokens_per_second.median, base_prefill[r.shape].tokens_per_second.median)
            for r in candidate.prefill if r.shape in base_prefill
        },
        "decode_tokens_per_second": None,
    }
    if candidate.decode and baseline.decode:
        ratios["decode_tokens_per_second"] = ratio_or_none(
            candidate.decode.tokens_per_second.median, baseline.decode.tokens_per_second.median
        )
    return ratios
