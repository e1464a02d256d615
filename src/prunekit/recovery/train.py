"""LoRA recovery of a pruned model with upstream peft: train the adapters, merge them into the weights.

The loop is plain PyTorch (peft supplies the LoRA layers, transformers the schedule): each optimizer step takes
``batch_size`` examples in micro-batches; the loss is the mean over the step's target tokens whatever the micro-batch
split. Example order is a seeded permutation per epoch and the LoRA initialisation and dropout draw from the seeded
torch generator, whose state is saved with every state, so a run resumed from its last saved step gives the same
weights as one that was never interrupted.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from prunekit.errors import PrunekitError
from prunekit.evaluation.memory import PeakMemory
from prunekit.recovery.examples import IGNORE, Examples, collate
from prunekit.recovery.recipes import Recipe
from prunekit.recovery.state import latest_step, load_state, save_state


@dataclass
class RecoveryResult:
    model: nn.Module
    steps: int
    examples: int
    trained_tokens: int
    target_tokens: int
    seconds: float
    peak_memory_bytes: int | None
    memory_method: str
    resumed_from: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "examples": self.examples, "trained_tokens": self.trained_tokens,
                "target_tokens": self.target_tokens, "seconds": round(self.seconds, 1),
                "peak_memory_bytes": self.peak_memory_bytes, "memory_method": self.memory_method,
                "resumed_from_step": self.resumed_from, "history": self.history}


def planned_steps(examples: int, recipe: Recipe, max_steps: int | None) -> int:
    total = recipe.epochs * math.ceil(examples / recipe.batch_size)
    return min(total, max_steps) if max_steps else total


def recover(model: nn.Module, examples: Examples, recipe: Recipe, *, pad_id: int, seed: int = 0,
            max_steps: int | None = None, state_dir: Path | None = None, save_every: int = 0,
            settings: dict[str, Any] | None = None, progress: bool = True) -> RecoveryResult:
    """Train LoRA adapters on ``examples`` and merge them into ``model`` (a pruned model, changed in place)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    if getattr(model, "prunekit_plan", None) is None:
        raise PrunekitError("recover fine-tunes a model pruned by prunekit; this model carries no pruning plan")
    torch.manual_seed(seed)
    config = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout, bias="none",
                        target_modules=list(recipe.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = {name: parameter for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    total = planned_steps(len(examples), recipe, max_steps)
    scheduler = get_scheduler(recipe.schedule, optimizer, num_warmup_steps=min(recipe.warmup_steps, total),
                              num_training_steps=total)
    settings = settings or {}
    start, history = 0, []
    saved = latest_step(state_dir) if state_dir is not None else None
    if saved is not None:
        start, history = load_state(saved, trainable, optimizer, scheduler, settings)
    peft_model.train()
    started = time.perf_counter()
    with PeakMemory(next(model.parameters()).device) as memory:
        bar = tqdm(range(start, total), desc="recover", unit="step", disable=not progress, initial=start,
                   total=total)
        for step in bar:
            chosen = step_examples(len(examples), recipe.batch_size, seed, step)
            loss = _optimizer_step(peft_model, examples, chosen, recipe, pad_id, trainable)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step + 1, "loss": round(loss, 6), "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss:.3f}")
            if state_dir is not None and save_every and (step + 1) % save_every == 0 and step + 1 < total:
                save_state(state_dir, step + 1, trainable, optimizer, scheduler, settings, history)
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.prunekit_plan.weights_edited = True  # LoRA changed kept weights: the plan alone cannot rebuild them
    seen = [index for step in range(total) for index in step_examples(len(examples), recipe.batch_size, seed, step)]
    trained = sum(len(examples.input_ids[index]) for index in seen)
    targets = sum(examples.targets(index) for index in seen)
    return RecoveryResult(merged, total, len(examples), trained, targets, time.perf_counter() - started,
                          memory.bytes, memory.method, start, history)


def step_examples(count: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples optimizer step ``step`` trains on: its slice of its epoch's seeded permutation."""
    epoch, position = divmod(step, math.ceil(count / batch_size))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size: (position + 1) * batch_size].tolist()


def _optimizer_step(model: nn.Module, examples: Examples, chosen: list[int], recipe: Recipe, pad_id: int,
                    trainable: dict[str, nn.Parameter]) -> float:
    """Forward / backward over the micro-batches of one step; returns the step's mean target-token loss."""
    targets = sum(examples.targets(index) for index in chosen)
    if targets == 0:
        raise PrunekitError("a training step has no target tokens (every answer was cut off); raise --seqlen")
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(chosen), recipe.micro_batch_size):
        part = chosen[start: start + recipe.micro_batch_size]
        batch = collate([examples.input_ids[i] for i in part], [examples.labels[i] for i in part], pad_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                   ignore_index=IGNORE, reduction="sum")
        (loss_sum / targets).backward()
        total += float(loss_sum.detach())
    if not math.isfinite(total):
        raise PrunekitError("the recovery loss is not finite; lower --lr")
    torch.nn.utils.clip_grad_norm_(list(trainable.values()), recipe.max_grad_norm)
    return total / targets
