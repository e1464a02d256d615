"""``prunekit.prune``: calibrate, run a method, materialise its plan, and measure before and after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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
    save_dtype: torch.dtype | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` in place with ``method`` to ``ratio`` (or, for the depth methods, by ``blocks`` units)
    and return the materialised result. The model is put in eval mode.

    ``options`` override the method's hyperparameters (``prunekit methods`` lists them with their defaults).
    With ``evaluation`` windows, perplexity is measured before and after; they must not be calibration text.
    ``state_path``: where a resumable method keeps its progress (a rerun with the same inputs continues).
    ``save_dtype``: the returned model holds the pruned weights rounded to it (and measured so), still computing
    in the model's dtype, as an onloaded run measures its saved checkpoint; cast it before saving.
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
    plan = _recorded(outcome.plan, spec, config, seed, calibration)
    apply_plan(model, plan, edited_weights=spec.capabilities.edits_weights)
    if save_dtype is not None:
        dtype = next(model.parameters()).dtype
        model.to(save_dtype).to(dtype)  # exact round trip when save_dtype is the narrower one
    metrics["prune_seconds"] = round(time.perf_counter() - started, 2)
    metrics["parameters"] = measured_ratios(model, adapter).to_dict()
    if evaluation is not None:
        metrics["perplexity_after"] = perplexity(model, evaluation, progress=progress).to_dict()
    plan.metrics = {**plan.metrics, **metrics}  # what the method recorded (per-layer reports, labels) stays
    return PruneResult(model=model, tokenizer=tokenizer, plan=plan, metrics=metrics, artifacts=outcome.artifacts)


def _recorded(plan: PruningPlan, spec: Method, config, seed: int, calibration: TokenWindows | None) -> PruningPlan:
    """The plan with what produced it: method, settings, seed, calibration, whether it edited weights."""
    plan.method, plan.settings, plan.seed = spec.name, config.to_dict(), seed
    plan.weights_edited = spec.capabilities.edits_weights
    plan.calibration = calibration.describe() if calibration is not None else {}
    return plan


def prune_onloaded(
    source: str | Path | nn.Module,
    method: str,
    out: str | Path,
    ratio: float | None = None,
    ratio_of: str = "all",
    calibration: TokenWindows | None = None,
    evaluation: TokenWindows | None = None,
    seed: int = 0,
    progress: bool = True,
    blocks: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    save_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    state_path: str | Path | None = None,
    tokenizer: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """:func:`prune` for a model too large for memory: the layers of ``source`` (a safetensors model directory)
    are read one at a time for the method, the perplexities and the materialisation, which writes the pruned
    checkpoint ``out`` shard by shard (``io.streamed``). ``save_dtype`` (default ``dtype``) is the checkpoint's.
    ``source`` may also be a dense model in CPU memory (``--offload cpu``, with ``tokenizer``): its modules are
    copied to ``device`` one at a time. Returns the metrics, as saved in the checkpoint's manifest."""
    from prunekit.distributed import leader
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.io.streamed import save_streamed
    from prunekit.models.loading import is_pruned_checkpoint
    from prunekit.models.onloading import EditStore, open_in_memory, open_onloaded
    from prunekit.structure.params import measured_ratios

    spec = method_info(method)
    if not spec.capabilities.onloading:
        supported = sorted(name for name, item in available_methods().items() if item.capabilities.onloading)
        raise PrunekitError(f"method '{spec.name}' cannot run on an onloaded model yet (--offload disk); methods "
                            f"that can: {', '.join(supported)}")
    target, config = resolve_target(spec, ratio, ratio_of, blocks), spec.configure(options)
    in_memory = isinstance(source, nn.Module)
    if not in_memory and is_pruned_checkpoint(source):
        raise PrunekitError(f"{source} is already pruned; prune the dense model it came from")
    save_dtype = save_dtype or dtype
    edits = EditStore(Path(out).absolute().parent, save_dtype) if spec.capabilities.edits_weights else None
    try:
        if in_memory:
            model, adapter = open_in_memory(source, device, edits)
        else:
            model, adapter, tokenizer = open_onloaded(source, dtype, device, edits)
        metrics: dict[str, Any] = {"target": target.describe(), "offload": "cpu" if in_memory else "disk"}
        if evaluation is not None:
            metrics["perplexity_before"] = perplexity(model, evaluation, progress=progress).to_dict()
        started = time.perf_counter()
        outcome = spec(PruneContext(model, adapter, target, config, calibration, seed, progress,
                                    Path(state_path) if state_path else None))
        plan = _recorded(outcome.plan, spec, config, seed, calibration)

        def after(staging: Path) -> dict[str, Any]:
            metrics["prune_seconds"] = round(time.perf_counter() - started, 2)
            metrics["parameters"] = measured_ratios(model, adapter).to_dict()
            metrics["source_reads"] = model.prunekit_onloader.checkpoint.read_summary()
            if evaluation is not None:
                pruned, _, _ = open_onloaded(staging, dtype, device)
                metrics["perplexity_after"] = perplexity(pruned, evaluation, progress=progress).to_dict()
            return {"metrics": metrics}

        if leader():  # under torchrun one process writes the checkpoint
            save_streamed(model.prunekit_onloader, plan, tokenizer, out, dtype=save_dtype, overwrite=overwrite,
                          artifacts=outcome.artifacts, before_manifest=after, progress=progress)
    finally:
        if edits is not None:
            edits.close()
    return metrics


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
