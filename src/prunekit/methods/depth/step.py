"""One greedy step of a depth search: score every eligible unit, the winner is the minimum of (NLL sum, key).

Exactness (``abandon_bound``): the bound is the best complete sum so far (``"best"``, default, the spec's rule; the
logged best/runner-up margin may then be a lower bound, flagged ``margin_exact: false``) or the runner-up's
(``"runner_up"``: a little less abandoning, the margin stays exact). Every unit whose total is <= the bound is
always scored completely, and ties are settled by the canonical key among completed units. The order in which
units are scored (the previous step's ranking) only affects speed.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from prunekit.distributed import split_map
from prunekit.errors import PrunekitError
from prunekit.methods.depth.stack import BranchStack, Score
from prunekit.methods.depth.units import Unit

# Carried streams are kept at the first points of this many likely winners per candidate (``stack``, point 4).
# Measured on the golden case with 1 guess: 99,543 branch runs against 132,572 without carrying (75%), about
# 410 window-streams kept per step (0.5 GB for SmolLM2, 512-token windows). A replay of the recorded steps gives
# 2 guesses no gain while only the largest valid stream per unit is kept (a candidate started from a carried
# stream cannot capture before it); each guess costs as much memory again.
CARRY_GUESSES = 1


@dataclass
class StepOutcome:
    """The winner of one step, its runner-up, and every candidate's (possibly partial) score."""

    best: Unit
    best_sum: float
    runner_up: Unit | None
    runner_up_sum: float | None  # exact when margin_exact, else a lower bound of the runner-up's sum
    margin_exact: bool
    scores: dict[Unit, Score]


def run_step(stack: BranchStack, order: Sequence[Unit], abandon_bound: str | None,
             progress: bool = False, desc: str = "step") -> StepOutcome:
    """Score every unit of ``order``; the winner is the minimum of (NLL sum, canonical key) over all of them.

    ``abandon_bound`` None scores every unit completely; otherwise see the module docstring (exactness). Under
    torchrun the units are split across the processes (``prunekit.distributed``), each abandoning against its own
    best; the winner is the same, only abandoned candidates' partial sums may differ.
    """
    def score_one(unit: Unit, bound: float, complete: list[tuple[float, tuple[int, int], int]],
                  units: Sequence[Unit]) -> Score:
        capture = ([guess.points[0] for guess in likely_winners(units, complete, stack.first_branch(unit))]
                   if stack.carry_bytes else [])
        return stack.score(unit, bound, capture)

    scores = split_map(lambda share: score_in_order(share, abandon_bound, score_one, progress, desc), order)
    return step_outcome(dict(zip(order, scores, strict=True)))


def step_outcome(scores: dict[Unit, Score]) -> StepOutcome:
    """The winner (minimum of NLL sum and canonical key over complete scores), its runner-up and the margin's
    exactness, from every unit's (possibly partial) score."""
    order = list(scores)
    complete = sorted((score.nll_sum, unit.key, position) for position, (unit, score) in enumerate(scores.items())
                      if score.complete)
    if not complete or not math.isfinite(complete[0][0]):
        raise PrunekitError("every candidate gives a non-finite calibration loss; the model diverges")
    best_sum, best = complete[0][0], order[complete[0][2]]
    lowest_abandoned = min((s.nll_sum for s in scores.values() if not s.complete), default=math.inf)
    if len(complete) > 1:
        runner_sum, runner = complete[1][0], order[complete[1][2]]
        exact = runner_sum <= lowest_abandoned
        runner_sum = min(runner_sum, lowest_abandoned)
    else:  # a single candidate, or (bound "best") every other one abandoned
        runner = None
        runner_sum = lowest_abandoned if math.isfinite(lowest_abandoned) else None
        exact = len(order) == 1
    return StepOutcome(best, best_sum, runner, runner_sum, exact, scores)


ScoreOne = Callable[[Unit, float, list[tuple[float, tuple[int, int], int]], Sequence[Unit]], Score]


def score_in_order(units: Sequence[Unit], abandon_bound: str | None, score_one: ScoreOne, progress: bool = False,
                   desc: str = "step") -> list[Score]:
    """Each unit's score in turn, ``score_one(unit, bound, complete so far, units)``, abandoning against the best
    (or runner-up) complete sum seen so far."""
    complete: list[tuple[float, tuple[int, int], int]] = []  # sorted (sum, key, position) of complete units
    scores = []
    for position, unit in enumerate(tqdm(units, desc=desc, unit="cand", disable=not progress, leave=False)):
        score = score_one(unit, _bound(complete, abandon_bound), complete, units)
        scores.append(score)
        if score.complete:
            bisect.insort(complete, (score.nll_sum, unit.key, position))
    return scores


def likely_winners(order: Sequence[Unit], complete: list[tuple[float, tuple[int, int], int]], after: int,
                   count: int = CARRY_GUESSES) -> list[Unit]:
    """The ``count`` units starting after point ``after`` most likely to win the step: the best complete ones so
    far, then the first ones in ``order`` (the previous step's ranking). ``after`` is the candidate's first branch
    run: up to it the candidate's stream is the prefix cache's, and a winner before it is covered by that cache.
    Only decides where streams are kept (speed)."""
    guesses = [order[position] for _, _, position in complete if order[position].points[0] > after][:count]
    guesses += [other for other in order if other.points[0] > after and other not in guesses]
    return guesses[:count]


def _bound(complete: list[tuple[float, tuple[int, int], int]], abandon_bound: str | None) -> float:
    """The running sum above which a candidate is dropped: the best's or the runner-up's complete sum."""
    if abandon_bound is None:
        return math.inf
    index = 1 if abandon_bound == "runner_up" else 0
    return complete[index][0] if len(complete) > index else math.inf


def ranked(units: Sequence[Unit], ranking: Sequence[Unit] | None) -> list[Unit]:
    """``units`` in the previous step's ranking (unranked ones last, canonically); canonical without one."""
    canonical = sorted(units, key=lambda u: u.key)
    if not ranking:
        return canonical
    position = {unit: index for index, unit in enumerate(ranking)}
    return sorted(canonical, key=lambda u: position.get(u, len(position)))


def ranking_of(scores: dict[Unit, Score], num_windows: int) -> list[Unit]:
    """Units by score; an abandoned unit by its running sum extrapolated to all windows (only orders the search)."""
    def estimate(unit: Unit) -> float:
        score = scores[unit]
        return score.nll_sum if score.complete else score.nll_sum * num_windows / score.windows

    return sorted(scores, key=lambda unit: (estimate(unit), unit.key))
