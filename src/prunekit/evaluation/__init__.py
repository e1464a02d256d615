"""Evaluation: perplexity, speed and memory (and, in later modules, zero-shot accuracy)."""

from prunekit.evaluation.perplexity import PerplexityResult, perplexity
from prunekit.evaluation.speed import (
    SpeedResult,
    benchmark_speed,
    compare_speed,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    parse_shapes,
)

__all__ = [
    "PerplexityResult",
    "SpeedResult",
    "benchmark_speed",
    "compare_speed",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "parse_shapes",
    "perplexity",
]
