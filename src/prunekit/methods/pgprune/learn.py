"""The learning loop of a policy-gradient run: K sampled masks per step, the REINFORCE update, the projection,
held-out evaluation of the current top-k mask every ``eval_every`` steps, and the state saved every ``save_every``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prunekit.distributed import split_map
from prunekit.errors import PrunekitError
from prunekit.methods.pgprune.estimator import (
    EstimatorSettings,
    cosine_rate,
    finite_samples,
    gradient,
    update_baseline,
)
from prunekit.methods.pgprune.forwards import SampleForwards
from prunekit.methods.pgprune.policy import Policy
from prunekit.methods.pgprune.state import LearningState


@dataclass(frozen=True)
class LearnSettings:
    steps: int
    samples: int
    rates: dict[str, float]  # η_0 per kind
    estimator: EstimatorSettings
    eval_every: int
    save_every: int
    max_steps: int | None  # pause (state saved) after this many steps in this session
    seed: int


def generator_for(seed: int, stream: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, stream, index): draws never depend on where a run was resumed.

    The three are hashed into the seed: torch's CPU generator keeps only the low 32 bits of a seed, so packing
    them into one wide integer would make every seed and stream draw the same numbers.
    """
    digest = hashlib.sha256(f"pgprune:{seed}:{stream}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:4], "little"))


class BatchStream:
    """Mini-batches of whole calibration windows, reshuffled every epoch (the last partial batch is dropped)."""

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int):
        if windows.shape[0] < batch_size:
            raise PrunekitError(f"pgprune needs at least batch_size={batch_size} training windows, got "
                                f"{windows.shape[0]}; give more calibration tokens (--calib-tokens)")
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.per_epoch = windows.shape[0] // batch_size

    def batch(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.per_epoch)
        order = torch.randperm(self.windows.shape[0], generator=generator_for(self.seed, 1, epoch))
        return self.windows[order[position * self.batch_size:(position + 1) * self.batch_size]]


def heldout_loss(forwards: SampleForwards, windows: torch.Tensor, mask: dict, batch_size: int) -> float:
    """Mean loss of one mask over every held-out window."""
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        chunk = windows[start:start + batch_size]
        total += forwards.loss(chunk, mask) * chunk.shape[0]
    return total / windows.shape[0]


def learn(policy: Policy, forwards: SampleForwards, stream: BatchStream, heldout: torch.Tensor,
          settings: LearnSettings, state: LearningState, state_path: Path | None, fingerprint: str,
          progress: bool = True) -> LearningState:
    """Run the remaining steps of ``state``; returns it finished (or raises after ``max_steps``, state saved)."""
    evaluate = _evaluator(policy, forwards, heldout, stream.batch_size, state)
    if not state.evaluations:
        evaluate()  # step 0: the init mask
    bar = tqdm(total=settings.steps, initial=state.step, desc="pgprune", unit="step", disable=not progress)
    done_here = 0
    try:
        while state.step < settings.steps:
            started = time.perf_counter()
            record = _one_step(policy, forwards, stream, settings, state)
            state.step += 1
            state.seconds += time.perf_counter() - started
            state.history.append(record)
            done_here += 1
            bar.update(1)
            bar.set_postfix(loss=_short(record["loss"]), baseline=_short(record["baseline"]),
                            kept="/".join(f"{value:.3f}" for value in record["expected_kept"].values()))
            if state.step % settings.eval_every == 0 or state.step == settings.steps:
                evaluate()
            if state.step % settings.save_every == 0:
                state.save(state_path, fingerprint)
            if settings.max_steps is not None and done_here >= settings.max_steps and state.step < settings.steps:
                state.save(state_path, fingerprint)
                raise PrunekitError(f"pgprune paused after {state.step} of {settings.steps} steps (max_steps); state "
                                    f"saved in {state_path}; rerun the same command to continue")
    finally:
        bar.close()
    state.save(state_path, fingerprint)
    return state


def _one_step(policy: Policy, forwards: SampleForwards, stream: BatchStream, settings: LearnSettings,
              state: LearningState) -> dict:
    """Sample, measure, update, project (spec section 2, steps 1-6); the step's record for the history."""
    generator = generator_for(settings.seed, 0, state.step)
    masks = [policy.sample(generator) for _ in range(settings.samples)]
    batch = stream.batch(state.step)
    # Under torchrun each process computes a contiguous share of the K losses (every process drew the same masks).
    losses, masks = finite_samples(split_map(lambda share: forwards.losses(batch, share), masks, strided=False),
                                   masks)
    rates = {kind: cosine_rate(rate, state.step, settings.steps) for kind, rate in settings.rates.items()}
    record = {"step": state.step + 1, "samples": len(losses), "rates": rates}
    if len(losses) < 2:  # too few finite samples: no update this step (released behaviour)
        record.update(loss=None, baseline=state.baseline, expected_kept=policy.expected_fractions())
        return record
    mean = sum(losses) / len(losses)
    state.baseline = update_baseline(state.baseline, mean, settings.estimator.window)
    estimate = gradient(losses, masks, policy.probabilities, state.baseline, settings.estimator)
    for kind in policy.kinds:
        policy.probabilities[kind] = policy.probabilities[kind] - rates[kind] * estimate[kind]
    policy.project()
    record.update(loss=mean, baseline=state.baseline, expected_kept=policy.expected_fractions())
    return record


def _evaluator(policy: Policy, forwards: SampleForwards, heldout: torch.Tensor, batch_size: int,
               state: LearningState):
    def evaluate() -> None:
        mask = policy.final_masks(state.tie_scores)
        loss = heldout_loss(forwards, heldout, mask, batch_size)
        state.evaluations.append({"step": state.step, "heldout_loss": loss})

    return evaluate


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
