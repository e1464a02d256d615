"""``prunekit.prune``: calibrate, run a method, materialise its plan, and measure before and after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.methods.base import DEPTH, Method, PruneContext, Target, available_methods, method_info
from prunekit.models.adapters import adapter_for
from prunekit.structure.plan import PruningPlan


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
    state_path: str | Path | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` to ``ratio`` (or, for the depth methods, by ``blocks`` units)
    and return the materialised result. The model is put in eval mode.

    ``options`` override the method's hyperparameters (``prunekit methods`` lists them with their defaults).
    With ``evaluation`` windows, perplexity is measured before and after; they must not be calibration text.
    ``state_path``: where a resumable method keeps its progress (a rerun with the same inputs continues).
    """
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.structure.materialize import apply_plan
    from prunekit.structure.params import measured_ratios

    spec = method_info(method)
    target = resolve_target(spec, ratio, ratio_of, blocks)
    config = spec.configure(options)
    adapter = adapter_for(model)
    model.eval()
    metrics: dict[str, Any] = {"target": target.describe()}
    if evaluation is not None:
        metrics["perplexity_before"] = perplexity(model, evaluation, progress=progress).to_dict()
    started = time.perf_counter()
    context = PruneContext(model, adapter, target, config, calibration, seed, progress,
                           Path(state_path) if state_path else None)
    outcome = spec(context)
    plan = outcome.plan
    plan.method, plan.settings, plan.seed = spec.name, config.to_dict(), seed
    plan.weights_edited = spec.capabilities.edits_weights
    plan.calibration = calibration.describe() if calibration is not None else {}
    apply_plan(model, plan, edited_weights=spec.capabilities.edits_weights)
    metrics["prune_seconds"] = round(time.perf_counter() - started, 2)
    metrics["parameters"] = measured_ratios(model, adapter).to_dict()
    if evaluation is not None:
        metrics["perplexity_after"] = perplexity(model, evaluation, progress=progress).to_dict()
    plan.metrics = {**plan.metrics, **metrics}  # what the method recorded (per-layer reports, labels) stays
    return PruneResult(model=model, tokenizer=tokenizer, plan=plan, metrics=metrics, artifacts=outcome.artifacts)


def resolve_target(spec: Method, ratio: float | None, ratio_of: str = "all", blocks: int | None = None) -> Target:
    """The method's target from ``ratio`` or ``blocks`` (exactly one).

    The CLI checks its flags with this too (before loading the model), so the messages name the flags.
    """
    depth = spec.capabilities.kind == DEPTH
    if ratio is not None and blocks is not None:
        raise PrunekitError("give either --ratio or --blocks, not both")
    if ratio is None and blocks is None:
        raise PrunekitError("the following arguments are required: --ratio"
                            + (" or --blocks (one of the two)" if depth else ""))
    target = Target(ratio, ratio_of) if blocks is None else Target(blocks=blocks)
    spec.check_target(target)
    return target


def replayable_plan(plan: PruningPlan, where: str = "the plan") -> PruningPlan:
    """``plan``, if applying it to a fresh dense model reproduces its method's model; a one-line error if the
    method edited weights (recorded in the plan, or, for plans older than that field, known from the method)."""
    method = available_methods().get(plan.method)
    edited = plan.weights_edited
    if edited is None:
        edited = bool(method and method.capabilities.edits_weights)
    if edited:
        raise PrunekitError(f"{where} comes from '{plan.method}', which edits the kept weights: the plan alone cannot "
                            "reproduce its model; use the checkpoint it came from (--model CHECKPOINT_DIR)")
    plan.weights_edited = False
    return plan
