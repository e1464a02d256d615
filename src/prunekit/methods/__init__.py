"""Pruning methods: one module each, registered by name; ``prune`` runs any of them end to end.

Importing this package imports every method module, which registers it.
"""

from prunekit.methods import blockpruner, magnitude, shortgpt, sleb, slimgpt  # noqa: F401  (importing registers the methods)
from prunekit.methods.base import PruneResult, Target, available_methods, method_info, register
from prunekit.methods.run import prune

__all__ = ["PruneResult", "Target", "available_methods", "method_info", "prune", "register"]
