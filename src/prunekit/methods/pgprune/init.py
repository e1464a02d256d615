"""Initial keep-probabilities (spec section 2, "Initialisation"): Wanda-sp scores through the standardise-then-
sigmoid map (the released default), Gaussian noise through the same map (``random``), or the keep fraction
everywhere (``uniform``).

The Wanda-sp scores are taken as released: layer by layer, each layer scored on the outputs of the already
init-pruned layers (the shared layer-sequential procedure of ``methods.width`` with the uniform per-layer
allocation), a KV group scoring the mean of its query heads. Departures, both from the measured behaviour of the
released code on a small GQA model (spec section 8): the per-layer init mask uses the shared rounding with parameter
matching, so a model with 3 KV groups per layer does lose attention (the released rule prunes none there); and the
head size is the model's own (the release hard-codes 128).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from prunekit.calibration.statistics import NORMS, InputStatistics
from prunekit.data.windows import TokenWindows
from prunekit.methods.base import PruneContext, Target
from prunekit.methods.pgprune.budget import Budgets
from prunekit.methods.pgprune.policy import sigmoid_map
from prunekit.methods.wanda_sp import wanda_sp_scores
from prunekit.methods.width import Scores, WidthConfig, attention_units, sequential_plan

INITS = ("wanda-sp", "random", "uniform")


def wanda_sp_unit_scores(context: PruneContext, windows: TokenWindows, budgets: Budgets, attention_unit: str,
                         batch_size: int) -> dict[str, torch.Tensor]:
    """Per-unit Wanda-sp scores ``attention [L, a]``, ``channels [L, d_ff]`` from the layer-sequential pass."""
    adapter = context.adapter
    rows: dict[int, Scores] = {}

    def scorer(index: int, layer: nn.Module, statistics: dict[str, InputStatistics]) -> Scores:
        heads, channels = wanda_sp_scores(layer, adapter, statistics["o_proj"].feature_norms(),
                                          statistics["down_proj"].feature_norms())
        rows[index] = (attention_units(heads, adapter, attention_unit, reduce="mean"), channels)
        return heads, channels

    width = WidthConfig(allocation="uniform", match_parameters=True, attention_unit=attention_unit)
    init_context = dataclasses.replace(context, target=Target(1.0 - budgets.channel_fraction, "linear"),
                                       calibration=windows, config=width)
    sequential_plan(init_context, "pgprune", width, (NORMS,), scorer, batch_size=batch_size)
    order = range(adapter.num_layers)
    return {"attention": torch.stack([rows[index][0].float() for index in order]),
            "channels": torch.stack([rows[index][1].float() for index in order])}


def initial_probabilities(init: str, scores: dict[str, torch.Tensor], budgets: Budgets,
                          generator: torch.Generator, layer_units: bool) -> dict[str, torch.Tensor]:
    """s_0 per kind from ``scores`` (wanda-sp), noise (random) or the keep fraction (uniform)."""
    fractions = {"attention": budgets.attention_fraction, "channels": budgets.channel_fraction}
    shapes = {"attention": (budgets.num_layers, budgets.attention_per_layer),
              "channels": (budgets.num_layers, budgets.channels_per_layer)}
    probabilities = {}
    for kind, fraction in fractions.items():
        if init == "uniform":
            probabilities[kind] = torch.full(shapes[kind], fraction)
        else:
            source = scores[kind] if init == "wanda-sp" else torch.randn(shapes[kind], generator=generator)
            probabilities[kind] = sigmoid_map(source, fraction)
    if layer_units:  # no score for whole layers: every layer starts at the layer keep fraction
        probabilities["layers"] = torch.full((budgets.num_layers,), budgets.layer_fraction)
    return probabilities
