"""prunekit: training-free structured pruning of large language models.

Importing prunekit registers its checkpoint format with transformers, so ``AutoModelForCausalLM.from_pretrained``
loads pruned checkpoints too.
"""

from prunekit import data
from prunekit.errors import PrunekitError
from prunekit.evaluation import perplexity
from prunekit.io.checkpoint import load_pruned, register_with_transformers, save_pruned
from prunekit.methods import PruneResult, available_methods, prune
from prunekit.models import adapter_for, load_model
from prunekit.structure import PruningPlan, apply_plan

__version__ = "0.1.0"

register_with_transformers()

__all__ = [
    "PruneResult",
    "PrunekitError",
    "PruningPlan",
    "__version__",
    "adapter_for",
    "apply_plan",
    "available_methods",
    "data",
    "load_model",
    "load_pruned",
    "perplexity",
    "prune",
    "save_pruned",
]
