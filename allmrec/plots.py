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


def plot_learning_curve(curve: list[dict], path: Path, title: str) -> None:
    """Validation Hit@1 of each row against the training prompts seen (`curve` entries:
    {"prompts": n, "valid_hit@1": ..., "valid_bypass_hit@1": ...})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for point in curve for k in point if k.startswith("valid_")})
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        points = [(p["prompts"], p[key]) for p in curve if key in p]
        ax.plot(*zip(*points, strict=True), marker="o", label=key)
    ax.axhline(0.05, color="grey", linestyle=":", linewidth=1)  # random among 20
    ax.set(title=title, xlabel="training prompts", ylabel="validation Hit@1 (20 candidates)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
