"""Layer-by-layer calibration: captured layer inputs, per-linear input statistics, branch-level execution.

Shared by the layer-wise pruners (SlimGPT, Wanda-sp, FLAP, LLM-BIP, ShortGPT) and the block searches (BlockPruner,
SLEB), which start candidates from cached residuals via :func:`attention_branch` / :func:`mlp_branch`.
"""

from prunekit.calibration.branches import (
    LayerContext,
    attention_branch,
    head_logits,
    layer_forward,
    mlp_branch,
)
from prunekit.calibration.capture import capture_layer_inputs
from prunekit.calibration.runner import LayerwiseRunner
from prunekit.calibration.statistics import (
    HESSIAN,
    MOMENTS,
    NORMS,
    STATISTIC_KINDS,
    InputStatistics,
    input_statistics,
)
from prunekit.calibration.store import OFFLOAD_MODES, ActivationStore

__all__ = [
    "HESSIAN",
    "MOMENTS",
    "NORMS",
    "OFFLOAD_MODES",
    "STATISTIC_KINDS",
    "ActivationStore",
    "InputStatistics",
    "LayerContext",
    "LayerwiseRunner",
    "attention_branch",
    "capture_layer_inputs",
    "head_logits",
    "input_statistics",
    "layer_forward",
    "mlp_branch",
]
