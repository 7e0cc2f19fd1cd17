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


def plot_loss_curve(losses: Sequence[float], path: str | Path, title: str = "training loss") -> Path:
    """Write per-step losses and their moving average to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 10)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    try:
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="per step")
        if window > 1:
            ax.plot(steps, moving_average(losses, window), lw=1.8, label=f"mean of last {window}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
