"""Zero-shot accuracy through lm-eval on the in-memory model equals a direct computation of the same comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.evaluation.zero_shot import LOCAL_TASKS, LOCAL_TASKS_DIR, parse_tasks, zero_shot
from tests.conftest import make_tiny_model

LIMIT = 12


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log-probabilities of ``continuation`` after ``context``, and whether greedy decoding gives it: the
    encoding lm-eval's HFLM uses (whole string encoded, the context's tokens split off)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    target = whole[len(context_ids):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)[-len(target):]
    picked = logprobs[torch.arange(len(target)), torch.tensor(target)]
    return picked.sum().item(), bool((logprobs.argmax(-1) == torch.tensor(target)).all())


def _items(name: str) -> list[dict]:
    return [json.loads(line) for line in (LOCAL_TASKS_DIR / name).read_text().splitlines()][:LIMIT]


def _direct_accuracy(model, tokenizer) -> dict[str, dict[str, float]]:
    acc = acc_norm = 0
    for item in _items("continuation.jsonl"):
        scores = [_loglikelihood(model, tokenizer, item["context"], " " + c)[0] for c in item["choices"]]
        normalised = [s / len(c) for s, c in zip(scores, item["choices"], strict=True)]
        acc += max(range(4), key=scores.__getitem__) == item["label"]
        acc_norm += max(range(4), key=normalised.__getitem__) == item["label"]
    greedy = sum(_loglikelihood(model, tokenizer, item["context"], " " + item["target"])[1]
                 for item in _items("lastword.jsonl"))
    return {"prunekit_continuation": {"acc": acc / LIMIT, "acc_norm": acc_norm / LIMIT},
            "prunekit_lastword": {"acc": greedy / LIMIT}}


def test_lm_eval_accuracy_equals_direct_loglikelihood_comparisons(tiny_tokenizer):
    model = make_tiny_model("llama", layers=2, seed=3)
    result = zero_shot(model, tiny_tokenizer, "local", batch_size=4, limit=LIMIT)
    direct = _direct_accuracy(model, tiny_tokenizer)
    for task, metrics in direct.items():
        assert result.tasks[task]["items"] == LIMIT
        for metric, value in metrics.items():
            assert result.tasks[task][metric] == pytest.approx(value, abs=1e-9), (task, metric)
            p = value
            assert result.tasks[task][f"{metric}_stderr"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5)
    assert not model.training


def test_task_names_expand_local_and_reject_empty():
    assert parse_tasks("local,piqa,local") == [*LOCAL_TASKS, "piqa"]
    with pytest.raises(PrunekitError, match="--tasks is empty"):
        parse_tasks(" , ")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_eval_cli_runs_the_local_suite_and_writes_json(tiny_model_dir, tmp_path):
    out = tmp_path / "zs.json"
    done = _cli("eval", "--model", str(tiny_model_dir), "--tasks", "local", "--task-limit", "4", "--json", str(out),
                "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "it/s" not in done.stderr  # no progress bar: neither lm-eval's nor transformers' loading bar
    assert "prunekit_continuation" in done.stdout and "acc_norm" in done.stdout
    report = json.loads(out.read_text())
    assert set(report["zero_shot"]["tasks"]) == set(LOCAL_TASKS) and "perplexity" not in report


def test_unknown_and_unreachable_tasks_are_one_line_errors(tiny_model_dir):
    unknown = _cli("eval", "--model", str(tiny_model_dir), "--tasks", "no_such_task")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1
    assert "unknown zero-shot task 'no_such_task'" in unknown.stderr
    # Offline mode makes the hub refusal immediate; without a network the same line comes after datasets' retries.
    unreachable = _cli("eval", "--model", str(tiny_model_dir), "--tasks", "piqa", env={"HF_HUB_OFFLINE": "1",
                                                                                      "HF_DATASETS_OFFLINE": "1"})
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert "zero-shot task 'piqa': its data cannot be reached" in unreachable.stderr
