"""Plain-text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned first column, right-aligned others, one header rule."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            value.ljust(width) if index == 0 else value.rjust(width)
            for index, (value, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def before_after_table(metrics: dict, method: str) -> str:
    """The table ``prunekit prune`` prints: dense and pruned parameters, both ratios, perplexity, prune time."""
    counts = metrics["parameters"]
    before, after = metrics.get("perplexity_before"), metrics.get("perplexity_after")
    label = f"ppl {before['source']} L={before['seqlen']}" if before else "ppl"
    rows = [
        ["dense", counts["dense_parameters"], "0.00%", "0.00%", before["perplexity"] if before else None, "-"],
        [method, counts["pruned_parameters"], f"{counts['ratio_all']:.2%}", f"{counts['ratio_layers']:.2%}",
         after["perplexity"] if after else None, f"{metrics['prune_seconds']:.1f}"],
    ]
    return format_table(["model", "parameters", "ratio_all", "ratio_layers", label, "prune seconds"], rows)


def accuracy_cell(row: dict | None, metric: str, digits: int = 4, plus_minus: str = "+-") -> str:
    """``0.7250 +- 0.0224`` (or ``-`` when the task has no such metric)."""
    value = (row or {}).get(metric)
    if value is None:
        return "-"
    error = row.get(f"{metric}_stderr")
    return f"{value:.{digits}f}" + (f" {plus_minus} {error:.{digits}f}" if error is not None else "")


def zero_shot_table(tasks: dict[str, dict]) -> tuple[list[str], list[list[object]]]:
    """Headers and rows of zero-shot results: one row per task, acc and acc_norm with their standard errors."""
    rows = [[name, accuracy_cell(row, "acc"), accuracy_cell(row, "acc_norm"), row.get("items")]
            for name, row in tasks.items()]
    return ["task", "acc", "acc_norm", "items"], rows
