"""Zero-shot accuracy through lm-eval-harness, on the model in memory (no save and reload).

``zero_shot(model, tokenizer, ["local"])`` wraps the model in lm-eval's ``HFLM`` and runs its tasks: standard task
names (``piqa``, ``hellaswag``, ...) pass through to lm-eval when their data can be reached; ``local`` is the
offline suite shipped in ``evaluation/tasks`` (items from ``data.zero_shot_tasks``). A task lm-eval does not know,
or whose data cannot be reached, is a one-line error before anything runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit.errors import PrunekitError

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_ALIAS = "local"
LOCAL_TASKS = ("prunekit_continuation", "prunekit_lastword")
REPORTED_METRICS = ("acc", "acc_norm")


@dataclass
class ZeroShotResult:
    """Per task: each reported metric with its standard error (None where lm-eval gives none), and the count."""

    tasks: dict[str, dict[str, float | None]]
    limit: int | None
    seconds: float
    lm_eval_version: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "limit": self.limit, "seconds": round(self.seconds, 2),
                "lm_eval": self.lm_eval_version, **self.settings}


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    """Task names from ``piqa,hellaswag`` or a list; ``local`` expands to the offline suite (order kept)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise PrunekitError("--tasks is empty; give task names such as local or piqa,hellaswag")
    expanded: list[str] = []
    for name in names:
        for task in (LOCAL_TASKS if name == LOCAL_ALIAS else (name,)):
            if task not in expanded:
                expanded.append(task)
    return expanded


@functools.cache
def task_manager(include_defaults: bool):
    """lm-eval's task index with the offline suite; indexing lm-eval's own thousands of tasks takes about 10 s, so
    it is done only when a standard task is asked for, and once per process."""
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def load_tasks(names: Sequence[str]) -> tuple[dict, Any]:
    """lm-eval's task objects for ``names`` and the index they came from; one line naming the task for an
    unknown name or unreachable data."""
    manager = task_manager(any(name not in LOCAL_TASKS for name in names))
    for name in names:
        if name not in manager.all_tasks:
            raise PrunekitError(f"unknown zero-shot task '{name}': lm-eval has no such task; use local (the offline "
                                f"suite: {', '.join(LOCAL_TASKS)}) or a name from 'lm_eval ls tasks'")
    loaded = {}
    for name in names:
        try:
            loaded.update(manager.load([name])["tasks"])
        except Exception as error:  # noqa: BLE001  (datasets raises many kinds; each becomes one line)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PrunekitError(
                f"zero-shot task '{name}': its data cannot be reached ({type(error).__name__}: {reason}); run where "
                "the Hugging Face hub or a local datasets cache has it, or use --tasks local (offline)"
            ) from None
    return loaded, manager


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str] = LOCAL_ALIAS,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ZeroShotResult:
    """Run ``tasks`` (names or ``local``) with lm-eval on ``model`` as it is in memory; accuracy per task.

    ``limit``: the first ``limit`` items of each task (for quick runs; standard errors grow). The model's mode
    is restored afterwards.
    """
    names = parse_tasks(tasks)
    task_dict, manager = load_tasks(names)
    _quiet_lm_eval()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    started = time.perf_counter()
    device = next(model.parameters()).device
    was_training = model.training
    # HFLM takes an in-memory PreTrainedModel as is (no copy, no reload); it puts it in eval mode.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    if not progress:
        for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, request_type, functools.partial(getattr(type(lm), request_type), lm, disable_tqdm=True))
    try:
        with _lm_eval_bars(progress):
            output = evaluator.simple_evaluate(
                # bootstrap_iters > 0 turns on lm-eval's analytic standard error of a mean (acc, acc_norm); no task of
                # ours has a bootstrapped metric, so no bootstrap (and no worker pool) runs.
                model=lm, tasks=list(task_dict.values()), task_manager=manager, limit=limit, bootstrap_iters=1000,
                log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        model.train(was_training)
    return ZeroShotResult(_metrics(output["results"], names, output.get("n-samples", {})), limit,
                          time.perf_counter() - started, _lm_eval_version(),
                          {"batch_size": batch_size, "num_fewshot": 0, "seed": seed})


def _metrics(results: dict, names: Sequence[str], samples: dict) -> dict[str, dict[str, float | None]]:
    """``{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, ..., items}}`` from lm-eval's result keys."""
    table = {}
    for name in names:
        raw, row = results.get(name, {}), {}
        for metric in REPORTED_METRICS:
            if f"{metric},none" in raw:
                row[metric] = _number(raw[f"{metric},none"])
                row[f"{metric}_stderr"] = _number(raw.get(f"{metric}_stderr,none"))
        row["items"] = samples.get(name, {}).get("effective")
        table[name] = row
    return table


@contextlib.contextmanager
def _lm_eval_bars(progress: bool) -> Iterator[None]:
    """Without progress, also silence the bar lm-eval draws unconditionally while it builds each task's requests
    (``lm_eval.api.task`` calls ``tqdm`` directly; where a later lm-eval moves it, nothing changes here)."""
    import lm_eval.api.task as task_module

    original = getattr(task_module, "tqdm", None)
    if progress or original is None:
        yield
        return
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


def _number(value: Any) -> float | None:
    """lm-eval writes 'N/A' for a standard error it did not compute."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _quiet_lm_eval() -> None:
    """lm-eval logs every request batch, and warns that an in-memory model and custom datasets are what they are;
    prunekit prints its own summary. Errors still show."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
