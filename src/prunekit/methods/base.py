"""What every pruning method shares: the target, the registry, and the result.

A method is one function registered under a name. It receives the dense model (which it may update in place,
e.g. SlimGPT's compensation of o_proj / down_proj), its adapter, the pruning target and the calibration windows,
and returns a :class:`~prunekit.structure.plan.PruningPlan`. It never slices weights itself: materialisation is
done once, by :func:`prunekit.structure.materialize.apply_plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.adapters import ArchAdapter

RATIO_OF = ("all", "linear")


@dataclass(frozen=True)
class Target:
    """How much to remove: ``ratio`` of all parameters (``of="all"``, the default) or of decoder-layer linear
    weights (``of="linear"``)."""

    ratio: float
    of: str = "all"

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise PrunekitError(f"--ratio {self.ratio} is out of range; give a fraction in (0, 1), e.g. 0.2")
        if self.of not in RATIO_OF:
            raise PrunekitError(f"--ratio-of '{self.of}' is unknown; use all or linear")

    def layer_linear_ratio(self, adapter: ArchAdapter) -> float:
        """The equivalent share of decoder-layer linear weights, for methods that prune only those."""
        if self.of == "linear":
            return self.ratio
        from prunekit.structure.params import dense_parameter_counts

        dense = dense_parameter_counts(adapter)
        converted = self.ratio * dense.total / dense.layer_linear
        if converted >= 1.0:
            raise PrunekitError(
                f"removing {self.ratio:.0%} of all parameters needs {converted:.0%} of the layer weights; lower --ratio"
            )
        return converted


MethodFunction = Callable[..., Any]


@dataclass(frozen=True)
class MethodInfo:
    name: str
    function: MethodFunction
    needs_calibration: bool
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    calibration_tokens: int = 128 * 512
    calibration_seqlen: int = 512


_REGISTRY: dict[str, MethodInfo] = {}


def register(
    name: str,
    needs_calibration: bool,
    description: str,
    calibration_tokens: int = 128 * 512,
    calibration_seqlen: int = 512,
    **defaults: Any,
) -> Callable[[MethodFunction], MethodFunction]:
    """Decorator: make a method available to ``prunekit.prune`` and ``prunekit prune --method``.

    ``defaults`` are the method's hyperparameters (every one is an option); the calibration size is the
    method's default on a small model on CPU.
    """

    def decorate(function: MethodFunction) -> MethodFunction:
        _REGISTRY[name] = MethodInfo(
            name, function, needs_calibration, description, dict(defaults), calibration_tokens, calibration_seqlen
        )
        return function

    return decorate


def available_methods() -> dict[str, MethodInfo]:
    import prunekit.methods  # noqa: F401  (importing the package registers every method)

    return dict(_REGISTRY)


def method_info(name: str) -> MethodInfo:
    methods = available_methods()
    if name not in methods:
        raise PrunekitError(f"unknown method '{name}'; available: {', '.join(sorted(methods)) or 'none'}")
    return methods[name]


@dataclass
class PruneResult:
    """A pruned (materialised) model with everything needed to save and report it."""

    model: nn.Module
    tokenizer: Any
    plan: Any
    metrics: dict[str, Any]
    # Extra JSON files a method leaves in the checkpoint, by file name (e.g. BlockPruner's removal schedule).
    artifacts: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        from prunekit.io.checkpoint import save_pruned

        return save_pruned(self.model, self.tokenizer, directory, {"metrics": self.metrics}, overwrite=overwrite,
                           artifacts=self.artifacts)
