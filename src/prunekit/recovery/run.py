"""Recover a pruned checkpoint end to end: examples, perplexity before, LoRA training, merge, perplexity after, save.

The resumable state lives beside the output (``OUT.recover-state/``) while training runs and is deleted once the
checkpoint is saved. The saved manifest keeps what the pruned checkpoint's manifest held (method, settings,
metrics at prune time) and adds ``recovery``: the recipe, data, seed, steps, tokens, time, peak memory, loss
history and the perplexities before and after.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError
from prunekit.recovery.examples import Examples, corpus_examples, instruction_examples
from prunekit.recovery.recipes import Recipe
from prunekit.recovery.train import planned_steps, recover


@dataclass
class RecoveryRequest:
    source: Path  # the pruned checkpoint
    out: Path
    recipe: Recipe
    data: str = "mix"
    instructions: Path | None = None
    train_tokens: int = 262144
    train_on_inputs: bool = False
    max_steps: int | None = None
    save_every: int = 10
    eval_source: str | None = "mix"
    eval_tokens: int = 16384
    eval_seqlen: int = 512
    seed: int = 0
    overwrite: bool = False
    progress: bool = True

    @property
    def state_dir(self) -> Path:
        out = self.out.absolute()
        return out.with_name(f"{out.name}.recover-state")

    def settings(self) -> dict[str, Any]:
        """What changes the trained weights; a saved state is only resumed under the same values."""
        return {"source": str(self.source.absolute()), "recipe": self.recipe.to_dict(),
                "data": str(self.instructions) if self.instructions else self.data,
                "kind": "instructions" if self.instructions else "corpus", "train_tokens": self.train_tokens,
                "train_on_inputs": self.train_on_inputs, "max_steps": self.max_steps, "seed": self.seed}


def training_examples(request: RecoveryRequest, tokenizer: Any) -> Examples:
    if request.instructions is not None:
        return instruction_examples(tokenizer, request.instructions, request.recipe.seqlen, request.train_on_inputs)
    return corpus_examples(tokenizer, request.data, request.train_tokens, request.recipe.seqlen, request.seed,
                           request.eval_source)


def recover_checkpoint(request: RecoveryRequest, model: nn.Module, tokenizer: Any, manifest: dict[str, Any],
                       examples: Examples) -> dict:
    """Train on ``examples``, merge into ``model`` (loaded from ``request.source``) and save it; returns the
    recovery record."""
    from prunekit.data.windows import evaluation_windows
    from prunekit.evaluation.perplexity import perplexity
    from prunekit.io.checkpoint import save_pruned

    evaluation = None
    if request.eval_source is not None:
        seqlen = min(request.eval_seqlen, model.config.max_position_embeddings)
        evaluation = evaluation_windows(tokenizer, request.eval_source, seqlen, request.eval_tokens)
    before = perplexity(model, evaluation, progress=request.progress) if evaluation is not None else None
    pad_id = next(value for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if value is not None)
    result = recover(model, examples, request.recipe, pad_id=pad_id, seed=request.seed, max_steps=request.max_steps,
                     state_dir=request.state_dir, save_every=request.save_every, settings=request.settings(),
                     progress=request.progress)
    after = perplexity(result.model, evaluation, progress=request.progress) if evaluation is not None else None
    record = {**request.settings(), "data_description": examples.source, **result.to_dict(),
              "perplexity_before": before.to_dict() if before else None,
              "perplexity_after": after.to_dict() if after else None}
    kept = {key: value for key, value in manifest.items() if key not in ("plan", "weights_sha256", "format_version")}
    save_pruned(result.model, tokenizer, request.out, {**kept, "recovery": record}, overwrite=request.overwrite)
    shutil.rmtree(request.state_dir, ignore_errors=True)
    return record


def check_request(request: RecoveryRequest) -> None:
    """Refuse what cannot work before the model loads."""
    from prunekit._atomic import check_output_directory
    from prunekit.data.corpora import check_source
    from prunekit.data.windows import check_one_window
    from prunekit.models.loading import is_pruned_checkpoint

    if not is_pruned_checkpoint(request.source):
        raise PrunekitError(f"recover fine-tunes a pruned checkpoint (a prunekit directory); {request.source} is "
                            "not one: prune it first with 'prunekit prune ... --out DIR'")
    check_output_directory(request.out, request.overwrite)
    if request.instructions is None:
        check_source(request.data)
        check_one_window(request.train_tokens, "--train-tokens", request.recipe.seqlen)
    elif not request.instructions.is_file():
        raise PrunekitError(f"--instructions {request.instructions} does not exist")
    if request.eval_source is not None:
        check_source(request.eval_source)
        check_one_window(request.eval_tokens, "--eval-tokens", request.eval_seqlen, "--eval-seqlen")
    if request.save_every < 0:
        raise PrunekitError(f"--save-every must be 0 (never) or positive, got {request.save_every}")


def describe_plan(request: RecoveryRequest, examples: int) -> str:
    steps = planned_steps(examples, request.recipe, request.max_steps)
    recipe = request.recipe
    return (f"recovery: {examples} examples, {steps} steps of {recipe.batch_size} (micro-batches of "
            f"{recipe.micro_batch_size}), LoRA rank {recipe.rank} alpha {recipe.alpha:g} on "
            f"{','.join(recipe.target_modules)}, lr {recipe.learning_rate:g} {recipe.schedule}")
