"""``prunekit.prune``: calibrate, run a method, materialise its plan, and measure before and after."""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.methods.base import PruneResult, Target, method_info
from prunekit.models.adapters import adapter_for


def prune(
    model: nn.Module,
    tokenizer: Any,
    method: str,
    ratio: float | None = None,
    ratio_of: str = "all",
    calibration: TokenWindows | None = None,
    evaluation: TokenWindows | None = None,
    seed: int = 0,
    progress: bool = True,
    blocks: int | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` to ``ratio`` (or, for the depth methods, by ``blocks`` units)
    and return the materialised result.

    ``options`` override the method's hyperparameters (``prunekit methods`` lists them with their defaults).
    With ``evaluation`` windows, perplexity is measured before and after; they must not be calibration text.
    """
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.structure.materialize import apply_plan
    from prunekit.structure.params import measured_ratios

    info = method_info(method)
    target, goal = resolve_target(info, ratio, ratio_of, blocks, options)
    settings = _merge_options(info.name, info.defaults, options)
    if info.needs_calibration and calibration is None:
        raise PrunekitError(f"method '{method}' needs calibration windows (prunekit.data.calibration_windows)")
    adapter = adapter_for(model)
    metrics: dict[str, Any] = {"target": goal}
    if evaluation is not None:
        metrics["perplexity_before"] = perplexity(model, evaluation, progress=progress).to_dict()
    started = time.perf_counter()
    outcome = info.function(model, adapter, target, calibration, seed=seed, progress=progress, **settings)
    # A method returns its plan, or (plan, artifacts) when it leaves extra files in the checkpoint.
    plan, artifacts = outcome if isinstance(outcome, tuple) else (outcome, {})
    plan.method, plan.settings, plan.seed = info.name, settings, seed
    plan.calibration = calibration.describe() if calibration is not None else {}
    apply_plan(model, plan)
    metrics["prune_seconds"] = round(time.perf_counter() - started, 2)
    metrics["parameters"] = measured_ratios(model, adapter).to_dict()
    if evaluation is not None:
        metrics["perplexity_after"] = perplexity(model, evaluation, progress=progress).to_dict()
    plan.metrics = metrics
    return PruneResult(model=model, tokenizer=tokenizer, plan=plan, metrics=metrics, artifacts=artifacts)


def resolve_target(info, ratio: float | None, ratio_of: str, blocks: int | None,
                   options: dict[str, Any]) -> tuple[Target | None, dict[str, Any]]:
    """The method's target from ``ratio`` or ``blocks`` (exactly one); ``blocks`` goes into ``options``.

    The CLI checks its flags with this too (before loading the model), so the messages name the flags.
    """
    depth = "blocks" in info.defaults
    if ratio is not None and blocks is not None:
        raise PrunekitError("give either --ratio or --blocks, not both")
    if ratio is None and blocks is None:
        raise PrunekitError("the following arguments are required: --ratio"
                            + (" or --blocks (one of the two)" if depth else ""))
    if blocks is None:
        return Target(ratio, ratio_of), {"ratio": ratio, "of": ratio_of}
    if not depth:
        raise PrunekitError(f"--blocks applies to the depth methods (blockpruner, shortgpt, sleb), not to "
                            f"'{info.name}'; use --ratio")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise PrunekitError(f"--blocks must be a positive whole number, got {blocks!r}")
    options["blocks"] = blocks
    return None, {"blocks": blocks}


def _merge_options(method: str, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        raise PrunekitError(f"method '{method}' has no option '{unknown[0]}'; its options: {known}")
    merged = dict(defaults)
    for key, value in options.items():
        merged[key] = _coerce(method, key, value, defaults[key])
    return merged


def _coerce(method: str, key: str, value: Any, default: Any) -> Any:
    """Options given as text on the command line take the type of their default."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        return type(default)(value)
    except ValueError:
        raise PrunekitError(f"option {key}={value!r} of '{method}' must be a {type(default).__name__}") from None
