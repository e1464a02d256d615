"""ShortGPT (Men et al., arXiv 2403.03853; method spec ``baselines.md`` section 4): remove the decoder layers that
change their input the least, in one shot.

Block Influence BI_l = 1 - mean_t cos(h_l,t, h_l+1,t), with h_l the residual stream entering layer l and h_l+1
the stream leaving it, averaged over every calibration token. The n layers with the smallest BI are removed (ties:
the earlier layer); no re-scoring. One layer-by-layer pass (``LayerwiseRunner``) gives every layer's input and
output. The per-layer scores are returned as the ``shortgpt_scores.json`` artifact.

Departures, each an option or named: calibration counted in tokens (default 32 x 512 of the project corpus, not
PG19); cosines in fp32 on the raw residual streams (the reference takes transformers' ``hidden_states``, whose
last entry is after the final norm); n from ``--blocks`` or the smallest n reaching the ratio target (``select``);
at least one layer is kept. ``metric="angular"`` uses arccos(cos) / pi (Gromov et al.), averaged over all tokens
like BI (the contiguous-block form is not implemented).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.calibration.runner import LayerwiseRunner
from prunekit.data.windows import TokenWindows
from prunekit.errors import PrunekitError
from prunekit.methods.base import DEPTH, Capabilities, MethodResult, PruneContext, register
from prunekit.methods.config import MethodConfig, option
from prunekit.methods.depth import LAYER, StopRule, Unit, plan_from_units, removal_ratios
from prunekit.methods.depth.units import SELECT_MODES
from prunekit.models.adapters import ArchAdapter

METRICS = ("bi", "angular")
SCORES_FILE = "shortgpt_scores.json"


@dataclass(frozen=True)
class ShortGPTConfig(MethodConfig):
    select: str = option("at_least", "with --ratio: remove the smallest count reaching it (at_least) or the count "
                         "whose ratio is closest (closest)", choices=SELECT_MODES)
    metric: str = option("bi", "layer score: Block Influence 1 - cos (bi) or arccos(cos) / pi (angular)",
                         choices=METRICS)
    batch_size: int = option(8, "calibration windows per forward pass", minimum=1)


@register("shortgpt", config=ShortGPTConfig, capabilities=Capabilities(DEPTH, nested=True, onloading=True),
          description="one-shot removal of the layers with the lowest Block Influence (Men et al. 2024)",
          calibration_tokens=32 * 512, calibration_seqlen=512)
def shortgpt(context: PruneContext) -> MethodResult:
    """Score every layer once and remove the lowest-scoring ones; ``--blocks K`` fixes their number."""
    config: ShortGPTConfig = context.config
    adapter, calibration = context.adapter, context.windows("shortgpt")
    rule = StopRule.from_target(context.target, config.select)
    scores = layer_influence(context.model, adapter, calibration, config.metric, config.batch_size, context.progress)
    order = [Unit(LAYER, layer) for layer in sorted(range(adapter.num_layers), key=lambda i: (scores[i], i))]
    removable = order[:-1]  # keep at least one layer
    rule.check_reachable(adapter, removable, "layers")
    ratios = [removal_ratios(adapter, removable[:count]) for count in range(len(removable) + 1)]
    chosen = rule.selected(ratios)
    removed = sorted(unit.layer for unit in removable[:chosen])
    artifact = {
        "method": "shortgpt", "metric": config.metric, "scores": scores,
        "order": [unit.layer for unit in order], "removed": removed, "target": rule.describe(),
        "ratio_all": ratios[chosen][0], "ratio_layers": ratios[chosen][1],
        "calibration": {"windows": calibration.num_windows, "seqlen": calibration.seqlen,
                        "tokens": calibration.num_tokens},
    }
    return MethodResult(plan_from_units(adapter, removable[:chosen]), {SCORES_FILE: artifact})


@torch.no_grad()
def layer_influence(model: nn.Module, adapter: ArchAdapter, calibration: TokenWindows, metric: str = "bi",
                    batch_size: int = 8, progress: bool = True) -> list[float]:
    """Per layer, the token mean of 1 - cos(input, output) (``bi``) or arccos(cos) / pi (``angular``)."""
    if metric not in METRICS:
        raise PrunekitError(f"unknown metric '{metric}'; use one of: {', '.join(METRICS)}")
    if calibration is None:
        raise PrunekitError("method 'shortgpt' needs calibration windows")
    totals = [0.0] * adapter.num_layers
    with LayerwiseRunner(model, adapter, calibration, batch_size=batch_size, progress=progress) as runner:
        for index, _ in runner.layers():
            def observe(rows: slice, inputs: torch.Tensor, outputs: torch.Tensor, index: int = index) -> None:
                cosine = F.cosine_similarity(inputs.float(), outputs.float(), dim=-1)
                values = 1.0 - cosine if metric == "bi" else torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi
                totals[index] += float(values.double().sum())

            runner.advance(index, on_batch=observe)
    return [total / calibration.num_tokens for total in totals]
