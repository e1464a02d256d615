"""Pruning methods: one module each, registered by name; ``prune`` runs any of them end to end.

Importing this package imports every method module, which registers it.
"""

from prunekit.methods import (  # noqa: F401  (importing registers them)
    blockpruner,
    flap,
    llmbip,
    magnitude,
    pgprune,
    shortgpt,
    sleb,
    slimgpt,
    taylor,
    wanda_sp,
)
from prunekit.methods.base import (
    Capabilities,
    Method,
    MethodResult,
    PruneContext,
    Target,
    available_methods,
    method_info,
    register,
)
from prunekit.methods.config import MethodConfig, option
from prunekit.methods.run import PruneResult, prune, resolve_target

__all__ = [
    "Capabilities",
    "Method",
    "MethodConfig",
    "MethodResult",
    "PruneContext",
    "PruneResult",
    "Target",
    "available_methods",
    "method_info",
    "option",
    "prune",
    "register",
    "resolve_target",
]
