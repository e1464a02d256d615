"""Policy-gradient mask learning (``pgprune``): Gao et al., "Bypass Back-propagation" (spec ``pgprune.md``).

Every KV group (query head on a one-KV-head model), every FFN channel and, with ``layer_units``, every decoder layer
gets a keep-probability; masks drawn from them are applied to the frozen model by the shared mask hooks, the loss
of each sampled model on a calibration mini-batch drives a forward-only REINFORCE estimate, and the probabilities
are projected back onto global per-type budgets after every step, so layers end up pruned unevenly. The final plan
keeps exactly the budgeted units (exact top-k); weights are never changed.

Modules: ``budget`` (target -> exact counts), ``policy`` (probabilities, sampling, projection, final top-k),
``estimator`` (baseline, gradient, schedule), ``forwards`` (the masked / batched / sliced losses), ``init``
(Wanda-sp + sigmap), ``learn`` (the loop), ``state`` (resume), and ``report.pgprune`` (the plots).

Departures from the release, each named where it is made: exact top-k with per-layer floors instead of the
threshold rule; the projection returns the feasible end of its bisection bracket; budgets are exact counts
converted in the target's own measure; the init mask's rounding; layer units (paper only) share the width budget
as ``layer_share``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from prunekit.errors import PrunekitError
from prunekit.methods.base import WIDTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import MethodConfig, option
from prunekit.methods.pgprune.budget import Budgets, compute_budgets
from prunekit.methods.pgprune.estimator import EstimatorSettings
from prunekit.methods.pgprune.forwards import EXECUTIONS, SampleForwards
from prunekit.methods.pgprune.init import INITS, initial_probabilities, wanda_sp_unit_scores
from prunekit.methods.pgprune.learn import BatchStream, LearnSettings, generator_for, learn
from prunekit.methods.pgprune.policy import Policy
from prunekit.methods.pgprune.state import LearningState
from prunekit.methods.run_state import fingerprint
from prunekit.models.onloading import onloader_of
from prunekit.structure.allocation import ATTENTION_UNITS, resolve_attention_unit
from prunekit.structure.masks import UnitMask
from prunekit.structure.plan import PruningPlan

log = logging.getLogger(__name__)

# Not part of the run's identity: they change when and how often it stops or saves, never what it learns.
_NOT_IDENTITY = ("save_every", "max_steps")


@dataclass(frozen=True)
class PGPruneConfig(MethodConfig):
    steps: int = option(3000, "optimisation steps S (the release ran 15,000 on 7B models)", minimum=1)
    samples: int = option(2, "masks sampled per step K", minimum=2)
    batch_size: int = option(8, "calibration windows per mini-batch B (window length: --seqlen, default 128)",
                             minimum=1)
    lr_heads: float = option(6e-3, "initial learning rate of the attention units' probabilities", above=0)
    lr_channels: float = option(6e-3, "initial learning rate of the FFN channels' probabilities", above=0)
    lr_layers: float = option(6e-3, "initial learning rate of the layer units' probabilities", above=0)
    baseline: str = option("ema", "ema (released: moving average of the step means) or leave_one_out",
                           choices=("ema", "leave_one_out"))
    baseline_window: int = option(5, "EMA window W of the baseline", minimum=1)
    estimator: str = option("released", "released: (m - s) / sqrt(s(1 - s)); exact: the score function "
                            "(m - s) / (s(1 - s))", choices=("released", "exact"))
    polarization: float = option(0.0, "weight of the polarisation term (0 in every published run)", minimum=0)
    init: str = option("wanda-sp", "initial probabilities: wanda-sp (scores through sigmap), random, uniform",
                       choices=INITS)
    init_windows: int = option(128, "calibration windows the Wanda-sp init is scored on", minimum=1)
    heldout_windows: int = option(16, "calibration windows kept out of training for the held-out loss", minimum=1)
    layer_units: bool = option(False, "learn whole-layer keep-probabilities too (paper, not released)")
    layer_share: float = option(0.5, "with layer_units: share of the removed parameters taken as whole layers",
                                above=0, maximum=1)
    budget_scope: str = option("global", "global: one budget per unit type over all layers (uneven layers); "
                               "layer: one per layer while learning (the final top-k stays global: exact "
                               "count)",
                               choices=("global", "layer"))
    attention_unit: str = option("auto", "kv_group, or q_head (one-KV-head models only); auto picks",
                                 choices=ATTENTION_UNITS)
    execution: str = option("auto", "how the K samples run: masked (one masked forward each, as released), "
                            "batched (one forward, per-row masks), sliced (kept units gathered); auto: sliced on "
                            "CPU (measured fastest), batched on GPU", choices=("auto", *EXECUTIONS))
    eval_every: int = option(100, "held-out loss of the current top-k mask every N steps", minimum=1)
    save_every: int = option(50, "save the resumable state every N steps", minimum=1)
    max_steps: int | None = option(None, "pause after this many steps in this session (state saved); rerun "
                                   "continues", minimum=1)


@register("pgprune", config=PGPruneConfig, capabilities=Capabilities(WIDTH, resumable=True, distributed=True,
                                                                      onloading=True),
          description="policy-gradient mask learning (Gao et al.): forward-only REINFORCE over Bernoulli keep-"
          "probabilities of KV groups, channels (and layers) under global budgets; uneven layers",
          calibration_tokens=2048 * 128, calibration_seqlen=128)
def pgprune(context: PruneContext) -> MethodResult:
    config: PGPruneConfig = context.config
    adapter = context.adapter
    unit = _attention_unit(adapter, config.attention_unit)
    budgets = compute_budgets(adapter, context.target, unit, config.layer_share if config.layer_units else 0.0)
    if config.layer_units and budgets.kept_layers == budgets.num_layers:
        raise PrunekitError(f"layer_units: layer_share={config.layer_share} of this target is less than one layer; "
                            "raise layer_share or --ratio")
    heldout, training, init_windows = _split(context, config)
    identity = {"config": {key: value for key, value in config.to_dict().items() if key not in _NOT_IDENTITY},
                "target": context.target.describe(), "seed": context.seed}
    print_ = fingerprint(context.model, adapter, context.windows("pgprune"), identity)
    started = time.perf_counter()
    state = LearningState.load(context.state_path, print_)
    if state is None:
        state = _initial_state(context, config, budgets, unit, init_windows)
    init_seconds = time.perf_counter() - started
    policy = Policy(state.probabilities, budgets, config.budget_scope)
    settings = _learn_settings(config, context.seed)
    stream = BatchStream(training, config.batch_size, context.seed)
    execution = _execution(config, context)
    with SampleForwards(context.model, adapter, unit, execution) as forwards:
        state = learn(policy, forwards, stream, heldout, settings, state, context.state_path, print_,
                      context.progress)
    final = policy.final_masks(state.tie_scores)
    plan = _plan(adapter, unit, final)
    initial = Policy(state.initial, budgets, config.budget_scope)
    init_plan = _plan(adapter, unit, initial.final_masks(state.tie_scores))
    summary = _summary(state, budgets, plan, init_seconds, execution)
    plan.metrics["pgprune"] = summary
    log.info("pgprune: held-out loss of the init mask %.4f -> learned mask %.4f after %d steps (%.2f s per step)",
             summary["heldout_loss_init_mask"], summary["heldout_loss_final_mask"], state.step,
             summary["seconds_per_step"])
    return MethodResult(plan, _artifacts(state, budgets, plan, init_plan))


def _attention_unit(adapter, requested: str) -> str:
    unit = resolve_attention_unit(adapter, requested)
    if unit == "q_head" and adapter.num_kv_heads > 1:
        raise PrunekitError("pgprune's q_head units are for one-KV-head models (a KV group's heads would have to "
                            "go in equal numbers); use attention_unit=kv_group or auto")
    return unit


def _execution(config: PGPruneConfig, context: PruneContext) -> str:
    if onloader_of(context.model) is not None:
        if config.execution not in ("auto", "masked"):
            raise PrunekitError(f"execution={config.execution} needs the whole model in memory; an onloaded model "
                                "runs the masked execution (execution=masked or auto)")
        return "masked"  # one walk over the layers per step, every sample advanced through each layer
    if config.execution != "auto":
        return config.execution
    on_gpu = next(context.model.parameters()).device.type == "cuda"
    return "batched" if on_gpu else "sliced"


def _split(context: PruneContext, config: PGPruneConfig):
    """(held-out, training, init) windows: a seeded shuffle first, since a mix lists its members in order."""
    windows = context.windows("pgprune")
    needed = config.heldout_windows + config.batch_size
    if windows.num_windows < needed:
        raise PrunekitError(f"pgprune needs at least {needed} calibration windows (heldout_windows + batch_size), "
                            f"got {windows.num_windows}; give more --calib-tokens")
    order = torch.randperm(windows.num_windows, generator=generator_for(context.seed, 3, 0))
    ids = windows.input_ids[order]
    heldout, training = ids[:config.heldout_windows], ids[config.heldout_windows:]
    init = dataclasses.replace(windows, input_ids=training[:config.init_windows], window_starts=[], parts={})
    return heldout, training, init


def _initial_state(context: PruneContext, config: PGPruneConfig, budgets: Budgets, unit: str,
                   init_windows) -> LearningState:
    scores = None
    if config.init == "wanda-sp":
        with torch.inference_mode():  # forward-only from the first pass on
            scores = wanda_sp_unit_scores(context, init_windows, budgets, unit, config.batch_size)
    probabilities = initial_probabilities(config.init, scores or {}, budgets, generator_for(context.seed, 2, 0),
                                          config.layer_units)
    ties = dict(scores) if scores else {kind: torch.zeros_like(values) for kind, values in probabilities.items()}
    if config.layer_units:
        ties["layers"] = torch.zeros(budgets.num_layers)
    policy = Policy(probabilities, budgets, config.budget_scope)
    policy.project()  # the sigmap's clamp can leave a sum a little above the budget
    return LearningState(policy.probabilities, ties, initial=dict(policy.probabilities))


def _learn_settings(config: PGPruneConfig, seed: int) -> LearnSettings:
    estimator = EstimatorSettings(config.estimator, config.baseline, config.baseline_window, config.polarization)
    rates = {"attention": config.lr_heads, "channels": config.lr_channels, "layers": config.lr_layers}
    if not config.layer_units:
        del rates["layers"]
    return LearnSettings(config.steps, config.samples, rates, estimator, config.eval_every, config.save_every,
                         config.max_steps, seed)


def _plan(adapter, unit: str, masks: dict[str, torch.Tensor]) -> PruningPlan:
    layers = masks.get("layers", torch.ones(adapter.num_layers))
    if unit == "q_head":
        mask = UnitMask(masks["attention"], masks["channels"], layers)
    else:
        mask = UnitMask.from_kv_groups(masks["attention"], masks["channels"], layers, adapter.heads_per_group)
    return mask.to_plan(adapter)


def _layer_widths(plan: PruningPlan) -> list[dict[str, int]]:
    return [{"heads": 0 if layer.layer_removed else len(layer.kept_heads),
             "kv_heads": 0 if layer.layer_removed else len(layer.kept_kv_heads),
             "channels": 0 if layer.layer_removed else len(layer.kept_channels)} for layer in plan.layers]


def _summary(state: LearningState, budgets: Budgets, plan: PruningPlan, init_seconds: float,
             execution: str) -> dict:
    """What the manifest records about the run."""
    evaluations = state.evaluations
    finished = [record for record in state.history if record["loss"] is not None]
    return {"budgets": budgets.to_dict(), "steps": state.step, "skipped_steps": state.step - len(finished),
            "execution": execution, "init_seconds": round(init_seconds, 2),
            "learning_seconds": round(state.seconds, 2),
            "seconds_per_step": round(state.seconds / max(1, len(state.history)), 4),
            "resumed_at": state.resumed_at,
            "heldout_loss_init_mask": evaluations[0]["heldout_loss"],
            "heldout_loss_final_mask": evaluations[-1]["heldout_loss"],
            "expected_kept_final": state.history[-1]["expected_kept"] if state.history else None,
            "layer_widths": _layer_widths(plan)}


def _artifacts(state: LearningState, budgets: Budgets, plan: PruningPlan, init_plan: PruningPlan) -> dict:
    """The learning history, the init mask's plan (to evaluate it), and the two plots."""
    from prunekit.report.pgprune import learning_plot, widths_plot

    history = {"budgets": budgets.to_dict(), "history": state.history, "evaluations": state.evaluations,
               "resumed_at": state.resumed_at}
    return {"pgprune-history.json": history, "pgprune-init-plan.json": init_plan.to_dict(),
            "pgprune-learning.png": learning_plot(state.history, state.evaluations),
            "pgprune-widths.png": widths_plot(_layer_widths(plan), _layer_widths(init_plan))}
