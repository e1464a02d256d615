"""What ``prunekit recover`` prints: perplexity before and after, and what the training cost."""

from __future__ import annotations

from prunekit.report.tables import format_table


def recovery_table(record: dict) -> str:
    """Before / after table of a recovery record (``prunekit.recovery.run.recover_checkpoint``)."""
    before, after = record.get("perplexity_before"), record.get("perplexity_after")
    rows = []
    if before and after:
        rows.append([f"perplexity ({before['source']}, {before['split']})", f"{before['perplexity']:.2f}",
                     f"{after['perplexity']:.2f}"])
    memory = record.get("peak_memory_bytes")
    lines = [format_table(["", "before recovery", "after recovery"], rows)] if rows else []
    lines.append(f"trained {record['steps']} steps on {record['trained_tokens']:,} tokens "
                 f"({record['target_tokens']:,} targets) in {record['seconds']:.0f} s"
                 + (f", peak memory +{memory / 2**20:.0f} MiB" if memory is not None else "")
                 + (f"; resumed from step {record['resumed_from_step']}" if record.get("resumed_from_step") else ""))
    return "\n".join(lines)
