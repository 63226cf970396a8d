"""Training-curve plots written beside a stage's outputs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss per epoch and every validation metric in `history`, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric_keys = sorted({k for row in history for k in row if k.startswith("valid_")})
    fig, axes = plt.subplots(1, 1 + len(metric_keys), figsize=(4.5 * (1 + len(metric_keys)), 3.5))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    epochs = [row["epoch"] for row in history]
    axes[0].plot(epochs, [row["loss"] for row in history])
    axes[0].set(title="training loss", xlabel="epoch")
    for ax, key in zip(axes[1:], metric_keys, strict=True):
        points = [(row["epoch"], row[key]) for row in history if key in row]
        ax.plot(*zip(*points, strict=True), marker="o")
        ax.set(title=key, xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
