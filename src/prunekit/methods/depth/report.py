"""What a depth search reports: the one-line summary of each step and the schedule artifact of the checkpoint."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from prunekit.data.windows import TokenWindows
from prunekit.methods.depth.state import SearchState
from prunekit.methods.depth.units import StopRule

if TYPE_CHECKING:
    from prunekit.methods.depth.stack import BranchStack

SCHEDULE_FORMAT, SCHEDULE_VERSION = "prunekit-depth-schedule", 1
COUNT_UNIT = "one sub-block (attention or MLP branch) or head run over one calibration window"


def counts_since(stack: BranchStack, before: dict[str, int]) -> dict[str, int]:
    """Branch, head, cache, screen and carry run counts since ``before`` (a copy of ``stack.counts``)."""
    return {f"{name}_executions": value - before.get(name, 0) for name, value in stack.counts.items()}


def finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def step_line(method: str, step: int, record: dict[str, Any]) -> str:
    """The one-line summary of a finished step (logged at INFO)."""
    return (f"{method} step {step}: remove {record['unit'][0]} {record['unit'][1]} -> calibration ppl "
            f"{record['ppl']:.4f}{_margin_note(record)}; ratio_all {record['ratio_all']:.2%}; "
            f"{record['seconds']:.1f} s, {record['branch_executions']} branch + {record['head_executions']} head runs"
            f"{_carried_note(record.get('carry_executions', 0))}, "
            f"{record['abandoned']}/{record['candidates']} abandoned")


def _margin_note(record: dict[str, Any]) -> str:
    """The runner-up and its margin; with every other candidate abandoned, only the margin's lower bound."""
    if record["margin"] is None:
        return ""
    sign = "+" if record["margin_exact"] else ">= +"
    runner = record["runner_up"]
    who = f"runner-up {runner[0]} {runner[1]}" if runner is not None else "every other candidate abandoned, margin"
    return f", {who} {sign}{record['margin']:.4f}"


def _carried_note(windows: int) -> str:
    return f" ({windows} windows from carried streams)" if windows else ""


def schedule_artifact(method: str, identity: dict[str, Any], rule: StopRule, options: dict[str, Any],
                      state: SearchState, chosen: int, calibration: TokenWindows) -> dict[str, Any]:
    """The schedule artifact: one list entry per searched step (index 0 of the ppl and ratio lists: dense)."""
    steps = state.steps

    def column(key: str) -> list[Any]:
        return [step[key] for step in steps]

    return {
        "format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "method": method,
        "order": column("unit"), "selected_blocks": chosen, "removed": column("unit")[:chosen],
        "calibration_ppl": [state.dense["ppl"], *column("ppl")],
        "calibration_nll_sum": [state.dense["nll_sum"], *column("nll_sum")],
        "ratio_all": [0.0, *column("ratio_all")], "ratio_layers": [0.0, *column("ratio_layers")],
        "runner_up": column("runner_up"), "margins": column("margin"), "margin_exact": column("margin_exact"),
        "seconds": column("seconds"), "dense_seconds": state.dense["seconds"],
        "branch_executions": column("branch_executions"), "head_executions": column("head_executions"),
        "cache_executions": column("cache_executions"), "screen_executions": column("screen_executions"),
        "carried_windows": [step.get("carry_executions", 0) for step in steps],
        "count_unit": COUNT_UNIT,
        "candidates": column("candidates"), "abandoned": column("abandoned"),
        "candidate_ppl": column("scores"),
        "target": rule.describe(), **options, **identity,
        "calibration": {"windows": calibration.num_windows, "seqlen": calibration.seqlen,
                        "scored_tokens": calibration.num_windows * (calibration.seqlen - 1)},
        "resumed_at_steps": state.resumed_at,
    }
