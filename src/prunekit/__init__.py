"""prunekit: training-free structured pruning of large language models."""

from prunekit import data
from prunekit.errors import PrunekitError
from prunekit.evaluation import perplexity
from prunekit.models import adapter_for, load_model

__version__ = "0.1.0"

__all__ = ["PrunekitError", "__version__", "adapter_for", "data", "load_model", "perplexity"]
