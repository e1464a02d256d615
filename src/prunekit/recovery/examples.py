"""Training examples for recovery: windows of a local text corpus, or records of an instruction file (JSONL).

A corpus gives ``--train-tokens / seqlen`` seeded random windows of its calibration split (the evaluation split
stays unseen, so held-out perplexity means what it says); every token is a target. An instruction file gives one
example per line, in any of three shapes:

- ``{"instruction": ..., "input": ... (optional), "output": ...}`` (Alpaca), rendered with a plain
  "### Instruction / ### Input / ### Response" layout;
- ``{"prompt": ..., "response": ...}`` (or ``"completion"``), concatenated;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with the tokenizer's chat template; the last
  message is the assistant's answer.

Only the answer's tokens (and an end-of-sequence token) are targets unless ``train_on_inputs``; examples are cut at
``seqlen`` tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunekit.errors import PrunekitError

IGNORE = -100  # the label torch's cross-entropy skips
TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class Examples:
    """Token ids and labels per example (lists of 1-D tensors, at most ``seqlen`` long) and where they came from."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    source: str
    kind: str  # "corpus" or "instructions"

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self, index: int) -> int:
        """Tokens of example ``index`` that are predicted and scored (the first token is never predicted)."""
        return int((self.labels[index][1:] != IGNORE).sum())

    @property
    def target_tokens(self) -> int:
        return sum(self.targets(index) for index in range(len(self)))


def corpus_examples(tokenizer: Any, source: str, train_tokens: int, seqlen: int, seed: int,
                    evaluation_source: str | None) -> Examples:
    """Seeded random windows of ``source``'s calibration split (a plain file: all of it, unless it is also the
    evaluation corpus)."""
    from prunekit.data.windows import calibration_windows

    same_as_eval = evaluation_source is not None and Path(source).resolve() == Path(evaluation_source).resolve()
    split = "all" if Path(source).is_file() and not same_as_eval else "calibration"
    windows = calibration_windows(tokenizer, source, train_tokens, seqlen, "random", seed, split=split)
    rows = list(windows.input_ids)
    return Examples(rows, [row.clone() for row in rows], f"{windows.source} ({windows.split} split)", "corpus")


def instruction_examples(tokenizer: Any, path: str | Path, seqlen: int, train_on_inputs: bool = False) -> Examples:
    """One example per JSONL record (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise PrunekitError(f"--instructions {path} does not exist; give a JSONL file with one record per line")
    input_ids, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PrunekitError(f"{path}:{number} is not JSON ({error.msg}); one JSON object per line") from None
        prompt, answer = _render(record, tokenizer, f"{path}:{number}")
        ids, targets = _tokenize(tokenizer, prompt, answer, train_on_inputs)
        input_ids.append(ids[:seqlen])
        labels.append(targets[:seqlen])
    if not input_ids:
        raise PrunekitError(f"--instructions {path} has no records")
    return Examples(input_ids, labels, str(path), "instructions")


def _render(record: Any, tokenizer: Any, where: str) -> tuple[str, str]:
    """(prompt text, answer text) of one record."""
    if not isinstance(record, dict):
        raise PrunekitError(f"{where} is not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise PrunekitError(f"{where}: 'messages' must be a list ending with the assistant's message")
        if not getattr(tokenizer, "chat_template", None):
            raise PrunekitError(f"{where} has 'messages' but the tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise PrunekitError(f"{where}: the chat template does not render the conversation as prompt + answer")
        return prompt, full[len(prompt):]
    if "instruction" in record and "output" in record:
        template = TEMPLATE_WITH_INPUT if record.get("input") else TEMPLATE
        return template.format(instruction=record["instruction"], input=record.get("input", "")), record["output"]
    if "prompt" in record and ("response" in record or "completion" in record):
        return record["prompt"], record.get("response", record.get("completion"))
    raise PrunekitError(f"{where} has none of the record shapes: instruction/output, prompt/response, messages")


def _tokenize(tokenizer: Any, prompt: str, answer: str, train_on_inputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    prompt_ids = tokenizer(prompt).input_ids
    full = tokenizer(prompt + answer).input_ids
    if tokenizer.eos_token_id is not None:
        full = [*full, tokenizer.eos_token_id]
    ids = torch.tensor(full, dtype=torch.long)
    labels = ids.clone()
    if not train_on_inputs:
        labels[: min(len(prompt_ids), len(full))] = IGNORE
    return ids, labels


def collate(input_ids: list[torch.Tensor], labels: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch with an attention mask; padding is never a target."""
    length = max(len(ids) for ids in input_ids)
    batch = torch.full((len(input_ids), length), pad_id, dtype=torch.long)
    targets = torch.full((len(input_ids), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(input_ids), length), dtype=torch.long)
    for row, (ids, target) in enumerate(zip(input_ids, labels, strict=True)):
        batch[row, : len(ids)], targets[row, : len(ids)], mask[row, : len(ids)] = ids, target, 1
    return {"input_ids": batch, "labels": targets, "attention_mask": mask}
