"""What every pruning method shares: its target, capabilities, the context it runs in, its result, the registry.

A method is one module: a config class (``methods.config``), a function ``run(context) -> MethodResult`` that only
scores and chooses, and a :func:`register` call. The function receives one :class:`PruneContext` (model, adapter,
target, config, calibration windows, seed, progress, state file) and returns one :class:`MethodResult` (the plan
and any extra JSON files for the checkpoint). It never slices weights itself: materialisation is done once, by
:func:`prunekit.structure.materialize.apply_plan`. A method may edit the dense model's weights in place (SlimGPT's
compensation, FLAP's biases) only if its capabilities say ``edits_weights``; the plan then records that it cannot
be re-applied to a fresh dense model.

Callers (the CLI, ``prunekit.prune``, ``compare``) decide from :class:`Capabilities`, never from option names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.methods.config import MethodConfig
from prunekit.models.adapters import ArchAdapter
from prunekit.structure.plan import PruningPlan

RATIO_OF = ("all", "linear")
WIDTH, DEPTH = "width", "depth"
DEFAULT_CALIBRATION_TOKENS, DEFAULT_CALIBRATION_SEQLEN = 128 * 512, 512


@dataclass(frozen=True)
class Target:
    """How much to remove: ``ratio`` of all parameters (``of="all"``, the default) or of decoder-layer linear
    weights (``of="linear"``); or, for depth methods, exactly ``blocks`` units."""

    ratio: float | None = None
    of: str = "all"
    blocks: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.blocks is None):
            raise PrunekitError("give either --ratio or --blocks (exactly one)")
        if self.ratio is not None and not (isinstance(self.ratio, int | float) and 0.0 < self.ratio < 1.0):
            raise PrunekitError(f"--ratio {self.ratio} is out of range; give a fraction in (0, 1), e.g. 0.2")
        if self.of not in RATIO_OF:
            raise PrunekitError(f"--ratio-of '{self.of}' is unknown; use all or linear")
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int)
                                        or self.blocks < 1):
            raise PrunekitError(f"--blocks must be a positive whole number, got {self.blocks!r}")

    def layer_linear_ratio(self, adapter: ArchAdapter) -> float:
        """The equivalent share of decoder-layer linear weights, for methods that prune only those."""
        if self.ratio is None:
            raise PrunekitError("this method needs a ratio target (--ratio), not --blocks")
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

    def describe(self) -> dict[str, Any]:
        return {"blocks": self.blocks} if self.blocks is not None else {"ratio": self.ratio, "of": self.of}


@dataclass(frozen=True)
class Capabilities:
    """What a method is and needs; every caller decides from these."""

    kind: str  # WIDTH (heads, channels) or DEPTH (blocks, layers)
    needs_calibration: bool = True
    needs_gradients: bool = False
    edits_weights: bool = False  # changes kept weights (compensation, added biases): a plan alone cannot redo it
    resumable: bool = False  # keeps its progress in a state file and continues from it when rerun
    nested: bool = False  # the result at K removals contains every smaller K (one search serves many targets)
    onloading: bool = False  # runs on a model whose layers are read from disk one at a time (--offload disk)
    distributed: bool = False  # splits its work across torchrun processes (prunekit.distributed)

    def __post_init__(self) -> None:
        if self.kind not in (WIDTH, DEPTH):
            raise ValueError(f"method kind must be {WIDTH} or {DEPTH}, not {self.kind!r}")


@dataclass
class PruneContext:
    """Everything a method gets. The model is dense (it may be edited in place if the method edits weights)."""

    model: nn.Module
    adapter: ArchAdapter
    target: Target
    config: MethodConfig
    calibration: TokenWindows | None = None
    seed: int = 0
    progress: bool = True
    state_path: Path | None = None  # resumable methods keep their progress here

    def windows(self, method: str) -> TokenWindows:
        if self.calibration is None:
            raise PrunekitError(f"method '{method}' needs calibration windows (prunekit.data.calibration_windows)")
        return self.calibration


@dataclass
class MethodResult:
    """What a method returns: its plan, and extra JSON files for the checkpoint (by file name)."""

    plan: PruningPlan
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method."""

    name: str
    description: str
    config: type[MethodConfig]
    capabilities: Capabilities
    run: Callable[[PruneContext], MethodResult]
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS  # the default on a small model on CPU
    calibration_seqlen: int = DEFAULT_CALIBRATION_SEQLEN

    def configure(self, options: Mapping[str, Any] | None = None) -> MethodConfig:
        """The method's config with ``options`` over its defaults (text or values; checked)."""
        return self.config.from_options(self.name, options)

    def check_target(self, target: Target) -> None:
        if target.blocks is not None and self.capabilities.kind != DEPTH:
            raise PrunekitError(f"--blocks applies to the depth methods ({', '.join(methods_of_kind(DEPTH))}), "
                                f"not to '{self.name}'; use --ratio")

    def apply_to(self, model: nn.Module, target: Target, calibration: TokenWindows | None = None, *, seed: int = 0,
                 progress: bool = True, state_path: str | Path | None = None, **options: Any) -> MethodResult:
        """Run the method on a dense model and return its plan, without materialising it (benchmarks, tests)."""
        from prunekit.models.adapters import adapter_for

        context = PruneContext(model, adapter_for(model), target, self.configure(options), calibration, seed,
                               progress, Path(state_path) if state_path else None)
        return self(context)

    def __call__(self, context: PruneContext) -> MethodResult:
        """Run the method in eval mode (the model's mode is restored afterwards)."""
        self.check_target(context.target)
        if self.capabilities.needs_calibration:
            context.windows(self.name)
        was_training = context.model.training
        context.model.eval()
        try:
            result = self.run(context)
        finally:
            context.model.train(was_training)
        if not isinstance(result, MethodResult):
            raise TypeError(f"method '{self.name}' returned {type(result).__name__}, not MethodResult")
        return result


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, config: type[MethodConfig], capabilities: Capabilities, description: str,
             calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
             calibration_seqlen: int = DEFAULT_CALIBRATION_SEQLEN) -> Callable:
    """Decorator: make ``run`` available as method ``name`` to ``prunekit.prune`` and ``prunekit prune``."""

    def decorate(run: Callable[[PruneContext], MethodResult]) -> Callable[[PruneContext], MethodResult]:
        if name in _REGISTRY:
            raise ValueError(f"a pruning method named '{name}' is already registered")
        config.options()  # fails now, at import, on a field that is not a typed option
        _REGISTRY[name] = Method(name, description, config, capabilities, run, calibration_tokens,
                                 calibration_seqlen)
        return run

    return decorate


def available_methods() -> dict[str, Method]:
    import prunekit.methods  # noqa: F401  (importing the package registers every method)

    return dict(_REGISTRY)


def method_info(name: str) -> Method:
    methods = available_methods()
    if name not in methods:
        raise PrunekitError(f"unknown method '{name}'; available: {', '.join(sorted(methods)) or 'none'}")
    return methods[name]


def methods_of_kind(kind: str) -> list[str]:
    return sorted(name for name, method in available_methods().items() if method.capabilities.kind == kind)
