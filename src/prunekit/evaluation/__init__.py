"""Evaluation: perplexity (and, in later modules, zero-shot accuracy, speed and memory)."""

from prunekit.evaluation.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
