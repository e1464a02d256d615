"""Plots of a policy-gradient run, saved beside its checkpoint as PNG: the learning curves (sampled loss, baseline,
held-out loss of the top-k mask; expected kept fraction per unit type) and the learned per-layer widths."""

from __future__ import annotations

import io
from collections.abc import Sequence

SMOOTHING = 25  # steps in the moving average drawn over the noisy per-step loss


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot

    return pyplot


def _png(pyplot, figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    averaged, total, queue = [], 0.0, []
    for value in values:
        queue.append(value)
        total += value
        if len(queue) > window:
            total -= queue.pop(0)
        averaged.append(total / len(queue))
    return averaged


def learning_plot(history: Sequence[dict], evaluations: Sequence[dict]) -> bytes:
    """Loss and expected kept fractions over steps."""
    pyplot = _figure()
    figure, (losses, kept) = pyplot.subplots(2, 1, figsize=(8, 7), sharex=True)
    finished = [record for record in history if record["loss"] is not None]
    steps = [record["step"] for record in finished]
    losses.plot(steps, [record["loss"] for record in finished], color="0.8", linewidth=0.6, label="sampled loss")
    losses.plot(steps, _moving_average([record["loss"] for record in finished], SMOOTHING), color="C0",
                label=f"sampled loss ({SMOOTHING}-step mean)")
    losses.plot(steps, [record["baseline"] for record in finished], color="C1", linewidth=0.8, label="baseline")
    losses.plot([entry["step"] for entry in evaluations], [entry["heldout_loss"] for entry in evaluations], "o-",
                color="C3", label="held-out loss, top-k mask")
    losses.set_ylabel("cross-entropy")
    losses.legend(fontsize=8)
    losses.set_title("pgprune: learning")
    for index, kind in enumerate(history[0]["expected_kept"] if history else []):
        kept.plot([record["step"] for record in history], [record["expected_kept"][kind] for record in history],
                  color=f"C{index}", label=kind)
    kept.set_xlabel("step")
    kept.set_ylabel("expected kept fraction")
    kept.legend(fontsize=8)
    figure.tight_layout()
    return _png(pyplot, figure)


def widths_plot(learned: Sequence[dict], initial: Sequence[dict]) -> bytes:
    """Kept query heads and channels per layer: the learned plan against the init mask."""
    pyplot = _figure()
    figure, axes = pyplot.subplots(2, 1, figsize=(8, 6), sharex=True)
    layers = range(len(learned))
    for axis, key in zip(axes, ("heads", "channels"), strict=True):
        axis.bar([layer - 0.2 for layer in layers], [width[key] for width in initial], width=0.4, color="0.7",
                 label="init mask")
        axis.bar([layer + 0.2 for layer in layers], [width[key] for width in learned], width=0.4, color="C0",
                 label="learned")
        axis.set_ylabel(f"kept {'query heads' if key == 'heads' else 'FFN channels'}")
        axis.legend(fontsize=8)
    axes[0].set_title("pgprune: per-layer widths")
    axes[1].set_xlabel("decoder layer")
    from matplotlib.ticker import MaxNLocator

    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return _png(pyplot, figure)
