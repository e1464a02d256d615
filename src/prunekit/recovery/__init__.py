"""Recovery fine-tuning after pruning: LoRA with upstream peft, merged into the weights, saved as a checkpoint."""

from prunekit.recovery.recipes import RECIPES, Recipe, build_recipe
from prunekit.recovery.train import RecoveryResult, recover

__all__ = ["RECIPES", "Recipe", "RecoveryResult", "build_recipe", "recover"]
