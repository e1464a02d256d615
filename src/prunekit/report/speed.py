"""The ``prunekit bench`` table: one row per model, then the ratio row (measurements come from
``prunekit.evaluation.speed``)."""

from __future__ import annotations

from collections.abc import Sequence

from prunekit.evaluation.speed import SpeedResult, Spread


def _throughput_cell(spread: Spread) -> str:
    return f"{spread.median:,.1f} ({spread.minimum:,.1f}-{spread.maximum:,.1f})"


def _ratio_cell(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def speed_table(results: Sequence[SpeedResult], ratios: dict | None = None) -> tuple[list[str], list[list]]:
    """Headers and rows for ``prunekit.report.format_table``: one row per model, then the ratio row if any.

    Throughput cells are "median (min-max)" tokens/s; shapes are those of the first result.
    """
    shapes = [r.shape for r in results[0].prefill]
    headers = ["model", "params", "weights MiB", "KV B/token", *(f"prefill {s} tok/s" for s in shapes),
               "decode tok/s", "peak MiB"]
    rows: list[list] = []
    for result in results:
        by_shape = {r.shape: r for r in result.prefill}
        rows.append([
            result.model, result.parameters, _megabytes(result.weight_bytes), f"{result.kv_bytes_per_token:,.0f}",
            *(_throughput_cell(by_shape[s].tokens_per_second) if s in by_shape else "-" for s in shapes),
            _throughput_cell(result.decode.tokens_per_second) if result.decode else "-",
            _megabytes(result.peak_memory_bytes),
        ])
    if ratios is not None:
        prefill = ratios["prefill_tokens_per_second"]
        rows.append([
            "ratio", _ratio_cell(ratios["parameters"]), _ratio_cell(ratios["weight_bytes"]),
            _ratio_cell(ratios["kv_bytes_per_token"]), *(_ratio_cell(prefill.get(s)) for s in shapes),
            _ratio_cell(ratios["decode_tokens_per_second"]), _ratio_cell(ratios["peak_memory_bytes"]),
        ])
    return headers, rows
