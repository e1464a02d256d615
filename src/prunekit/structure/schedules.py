"""Per-layer pruning ratios (shares of each decoder layer's linear weights), by schedule name.

- ``uniform``: the target in every layer.
- ``log_increase`` (SlimGPT's Incremental Pruning Ratio, spec 2.5): ``r_l = r_0 + (r_last - r_0) · log(l + 1) /
  log(n)``, capped at ``cap``. The paper states neither end. Without ``last`` prunekit's rule applies: ``r_0 =
  first`` (default 0) and ``r_last`` solved so that the mean of the capped ``r_l`` equals the target. With ``last``
  both ends are given, as in the released SlimGPT command for LLaMA-7B (0.0625 -> 0.25 over 32 layers, a mean of
  20.04%); the schedule's mean must then agree with the target within ``GIVEN_SCHEDULE_SLACK``. ``log(n)`` is the
  model's depth (the released driver hard-codes ``log(32)``).
- ``layer_range`` (LLM-Pruner): the first ``keep_first`` and the last ``keep_last`` layers untouched, one ratio in
  the others, raised so the mean over all layers equals the target. Default range from the baselines spec: the
  first ceil(n/8) and the last ceil(n/16) layers are kept (LLaMA-7B: layers 4-29 pruned).
"""

from __future__ import annotations

import math

from prunekit.errors import PrunekitError

SCHEDULES = ("uniform", "log_increase", "layer_range")
RATIO_CAP = 0.9
# How far the mean of a schedule with both ends given may be from the target (share of layer weights).
GIVEN_SCHEDULE_SLACK = 0.01


def layer_ratios(num_layers: int, target: float, schedule: str = "uniform", *, first: float = 0.0,
                 last: float | None = None, cap: float = RATIO_CAP, keep_first: int | None = None,
                 keep_last: int | None = None) -> list[float]:
    """The per-layer ratios of ``schedule`` whose mean is ``target`` (a share of layer weights)."""
    if schedule == "uniform":
        return uniform_ratios(num_layers, target)
    if schedule == "log_increase":
        return log_increasing_ratios(num_layers, target, first, cap, last)
    if schedule == "layer_range":
        return layer_range_ratios(num_layers, target, keep_first, keep_last, cap)
    raise PrunekitError(f"unknown schedule '{schedule}'; use one of: {', '.join(SCHEDULES)}")


def uniform_ratios(num_layers: int, target: float) -> list[float]:
    _check_target(target)
    return [target] * num_layers


def log_increasing_ratios(num_layers: int, target: float, first: float = 0.0, cap: float = RATIO_CAP,
                          last: float | None = None) -> list[float]:
    """Per-layer ratios rising with log(l + 1) (module docstring); ``last`` None solves it by bisection."""
    _check_target(target)
    if num_layers == 1:
        return [target]
    shape = [math.log(index + 1) / math.log(num_layers) for index in range(num_layers)]

    def ratios(end: float) -> list[float]:
        return [min(cap, first + (end - first) * s) for s in shape]

    if last is not None:
        return _given_schedule(ratios(last), target, first, last)
    if first > target:
        raise PrunekitError(f"first_ratio {first:g} is above the target {target:.2%} of layer weights: a schedule "
                            "that only rises from there cannot hit it; lower first_ratio")
    if sum(ratios(1e6)) / num_layers < target:
        raise PrunekitError(
            f"a log-increasing schedule from {first:g} capped at {cap:g} cannot remove {target:.1%} of layer weights; "
            "lower the ratio or use --schedule uniform"
        )
    low, high = first, 1e6
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(ratios(middle)) / num_layers < target else (low, middle)
    return ratios(high)


def _given_schedule(ratios: list[float], target: float, first: float, last: float) -> list[float]:
    mean = sum(ratios) / len(ratios)
    if abs(mean - target) > GIVEN_SCHEDULE_SLACK:
        raise PrunekitError(f"first_ratio {first:g} and last_ratio {last:g} remove {mean:.2%} of layer weights over "
                            f"{len(ratios)} layers, not the target {target:.2%}; change the ratio or drop last_ratio "
                            "to have it solved")
    return ratios


def default_layer_range(num_layers: int) -> tuple[int, int]:
    """(layers kept at the start, at the end): ceil(n/8) and ceil(n/16), the baselines spec's LLM-Pruner range."""
    return math.ceil(num_layers / 8), math.ceil(num_layers / 16)


def layer_range_ratios(num_layers: int, target: float, keep_first: int | None = None, keep_last: int | None = None,
                       cap: float = RATIO_CAP) -> list[float]:
    """0 in the kept layers at both ends, one ratio in between whose mean over all layers is ``target``."""
    _check_target(target)
    default_first, default_last = default_layer_range(num_layers)
    keep_first = default_first if keep_first is None else keep_first
    keep_last = default_last if keep_last is None else keep_last
    pruned = num_layers - keep_first - keep_last
    if keep_first < 0 or keep_last < 0 or pruned < 1:
        raise PrunekitError(f"layer range keeps {keep_first} first and {keep_last} last of {num_layers} layers; "
                            "leave at least one layer to prune")
    inner = target * num_layers / pruned
    if inner > cap:
        raise PrunekitError(f"removing {target:.1%} of layer weights from {pruned} of {num_layers} layers needs "
                            f"{inner:.1%} of each, above the cap {cap:g}; lower the ratio or widen the range")
    return [inner if keep_first <= index < num_layers - keep_last else 0.0 for index in range(num_layers)]


def _check_target(target: float) -> None:
    if not 0.0 <= target < 1.0:
        raise PrunekitError(f"pruning ratio {target} is out of range; give a value in [0, 1)")
