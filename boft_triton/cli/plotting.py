"""Loss-curve PNG for ``boft-triton train`` (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curve(losses: Sequence[float], path: str | Path, title: str = "training loss",
                    held_out: Sequence[dict] | None = None, window: int | None = None) -> Path:
    """Write per-step losses, their trailing mean over ``window`` steps (default: a tenth of the
    run) and the held-out points (``{"step", "loss", "accuracy", "examples"}``: loss on the loss
    axis, accuracy on a second axis) to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = list(range(1, len(losses) + 1))
    window = window or max(1, len(losses) // 10)
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=120)
    try:
        ax.plot(steps, losses, lw=0.8, alpha=0.35, label="training loss, each step's batch")
        if window > 1:
            ax.plot(steps, moving_average(losses, window), lw=1.8,
                    label=f"training loss, trailing mean over {window} steps")
        acc_ax = None
        if held_out:
            size = held_out[0].get("examples")
            of = f" ({size} test examples)" if size else ""
            ax.plot([p["step"] for p in held_out], [p["loss"] for p in held_out], "o-", color="black", lw=1.2,
                    ms=4, label=f"held-out loss{of}")
            acc_ax = ax.twinx()
            acc_ax.plot([p["step"] for p in held_out], [p["accuracy"] for p in held_out], "s--", color="tab:green",
                        lw=1.0, ms=4, label=f"held-out accuracy{of}")
            acc_ax.set_ylabel("held-out accuracy")
        handles, labels = ax.get_legend_handles_labels()
        if acc_ax is not None:  # one legend for both axes
            more = acc_ax.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(handles, labels, fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
