"""Export a uniformly pruned model as a plain Hugging Face checkpoint that stock transformers loads.

Possible when every surviving layer has the same number of query heads, KV heads and FFN channels and keeps both
of its blocks (whole removed layers are fine: the config simply has fewer layers). The exported config is the
dense one with the new global sizes; ``head_dim`` is written explicitly because it no longer equals
hidden_size / num_attention_heads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prunekit._atomic import OUTPUT_MARKERS, atomic_directory
from prunekit.errors import PrunekitError

EXPORT_MARKER = OUTPUT_MARKERS[1]  # prunekit-export.json


def uniform_shape(plan: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, channels) shared by every surviving layer, or a one-line error saying why not."""
    shapes = set()
    for index, layer in enumerate(plan.layers):
        if layer.layer_removed:
            continue
        if not (layer.has_attention and layer.has_mlp):
            block = "attention" if not layer.has_attention else "MLP"
            raise PrunekitError(f"cannot export uniformly: layer {index} has its {block} block removed")
        shapes.add((len(layer.kept_heads), len(layer.kept_kv_heads), len(layer.kept_channels)))
    if len(shapes) != 1:
        raise PrunekitError(
            f"cannot export uniformly: surviving layers have {len(shapes)} "
            f"different shapes {sorted(shapes)}"
        )
    return shapes.pop()


def export_uniform(model: nn.Module, tokenizer: Any, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``model`` (materialised by prunekit) as a stock checkpoint; returns the directory."""
    plan, dense = getattr(model, "prunekit_plan", None), getattr(model, "prunekit_dense_config", None)
    if plan is None or dense is None:
        raise PrunekitError("model carries no pruning plan; export needs a model pruned by prunekit")
    heads, kv_heads, channels = uniform_shape(plan)
    settings = dict(dense)
    model_type = settings.pop("model_type")
    surviving = plan.surviving_layers()
    settings.update(
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=channels,
        num_hidden_layers=len(surviving), head_dim=plan.dense["head_dim"],
    )
    if settings.get("layer_types"):
        settings["layer_types"] = [settings["layer_types"][index] for index in surviving]
    config = AutoConfig.for_model(model_type, **settings)
    stock = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise PrunekitError(f"cannot export uniformly: tensor {name} does not map onto the stock architecture")
    directory = Path(directory)
    with atomic_directory(directory, overwrite=overwrite) as staging:
        stock.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # Where it came from; also marks the directory as prunekit's, so --overwrite may replace it later.
        provenance = {"format": "prunekit-export", "method": plan.method, "seed": plan.seed,
                      "settings": plan.settings, "layers": plan.layer_shapes()}
        (staging / EXPORT_MARKER).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return directory
