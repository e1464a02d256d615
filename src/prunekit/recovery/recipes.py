"""The published LoRA recovery recipes, as defaults that every command-line option can override.

- ``llm-pruner`` (LLM-Pruner's post-training, also what LLM-BIP reuses): LoRA rank 8, alpha 16, dropout 0.05 on
  q/k/v/o/gate/up/down; AdamW at 1e-4 with 100 warm-up steps and linear decay; 64 examples per step in
  micro-batches of 4; 2 epochs; 256-token examples; gradient norm clipped at 1.0 (the Hugging Face Trainer's
  default it runs under).
- ``slimgpt``: SlimGPT's appendix: 1 epoch, AdamW at 1e-4 with cosine decay, 64 examples per step, 256 tokens.
  It does not state rank, alpha, dropout, target modules or warm-up; those are LLM-Pruner's (SlimGPT compares
  against LLM-Pruner under its recipe), with no warm-up.

Both papers train on Alpaca(-cleaned) instructions; prunekit trains on what ``--data`` / ``--instructions`` give
(offline by default: a local corpus), which is the main difference from the papers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from prunekit.errors import PrunekitError

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    name: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ALL_LINEARS
    learning_rate: float = 1e-4
    schedule: str = "linear"
    warmup_steps: int = 100
    batch_size: int = 64
    micro_batch_size: int = 4
    epochs: int = 2
    seqlen: int = 256
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values


RECIPES = {
    "llm-pruner": Recipe("llm-pruner"),
    "slimgpt": Recipe("slimgpt", schedule="cosine", warmup_steps=0, epochs=1),
}


def build_recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe with the given fields replaced (None leaves a default), checked."""
    if name not in RECIPES:
        raise PrunekitError(f"unknown recovery recipe '{name}'; choose one of {', '.join(RECIPES)}")
    recipe = replace(RECIPES[name], **{key: value for key, value in overrides.items() if value is not None})
    unknown = sorted(set(recipe.target_modules) - set(ALL_LINEARS))
    if unknown or not recipe.target_modules:
        raise PrunekitError(f"--target-modules must name some of {', '.join(ALL_LINEARS)}; got "
                            f"{', '.join(unknown) or 'none'}")
    if recipe.schedule not in SCHEDULES:
        raise PrunekitError(f"unknown --schedule '{recipe.schedule}'; choose one of {', '.join(SCHEDULES)}")
    if recipe.batch_size % recipe.micro_batch_size:
        raise PrunekitError(f"--batch-size {recipe.batch_size} is not a multiple of --micro-batch-size "
                            f"{recipe.micro_batch_size}")
    if not 0 <= recipe.dropout < 1:
        raise PrunekitError(f"--dropout must be in [0, 1), got {recipe.dropout}")
    if recipe.learning_rate <= 0 or recipe.alpha <= 0:
        raise PrunekitError("--lr and --alpha must be positive")
    return recipe
