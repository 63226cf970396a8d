"""The alpha/beta search of Stage 1 without Ray: checking a search, and writing its outcome.

Outputs of a search (`<run_dir>/tune/` by default):
- `results.csv` and `results.md`: one row per trial (alpha, beta, the metric, epochs run,
  whether ASHA stopped it early, its status);
- `alpha_beta.png`: the metric over alpha and beta;
- `best.yaml`: a config overlay with the best alpha and beta, which `allmrec train stage1`
  and `train stage2` take after the base config (`--config base.yaml --config best.yaml`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from allmrec.config import TuneConfig


def check_search(cfg: TuneConfig, epochs: int) -> None:
    """A search that cannot run is refused before anything starts, naming the field."""
    if cfg.search == "grid":
        for name in ("alpha", "beta"):
            values = getattr(cfg, name)
            if not values:
                raise ValueError(f"tune.{name}: an empty grid; give at least one value")
            if any(v < 0 or not math.isfinite(v) for v in values):
                raise ValueError(f"tune.{name}: {values}: weights must be finite and >= 0")
    else:
        for name in ("alpha_range", "beta_range"):
            low, high = getattr(cfg, name)
            if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or low >= high:
                raise ValueError(f"tune.{name}: [{low}, {high}]: expected 0 <= low < high")
            if cfg.log_uniform and low <= 0:
                raise ValueError(
                    f"tune.{name}: [{low}, {high}]: a log-uniform range needs low > 0 "
                    "(or tune.log_uniform=false)"
                )
    if not cfg.metric.startswith("valid_"):
        raise ValueError(
            f"tune.metric {cfg.metric!r}: expected a Stage 1 validation metric, e.g. "
            "valid_hit@1, valid_ndcg@10, valid_coldtext_hit@1"
        )
    if cfg.grace_period > epochs:
        raise ValueError(
            f"tune.grace_period {cfg.grace_period} is more than stage1.epochs {epochs}"
        )


COLUMNS = ("trial", "alpha", "beta", "metric", "epochs", "stopped_early", "status")


RESULT_FILES = ("results.csv", "results.md", "alpha_beta.png", "best.yaml")


def write_results(rows: list[dict], out: Path, metric: str, max_epochs: int) -> dict | None:
    """results.csv/.md, alpha_beta.png and best.yaml from one row per trial; returns the best
    row (None when no trial reported the metric)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["metric"] is None, -(r["metric"] or 0.0)))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    lines = [
        f"# Stage 1 alpha/beta search: {metric} (best of each trial), {len(rows)} trials",
        "",
        "| trial | alpha | beta | " + metric + " | epochs | stopped early | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = "" if r["metric"] is None else f"{r['metric']:.4f}"
        lines.append(
            f"| {r['trial']} | {r['alpha']:.4g} | {r['beta']:.4g} | {value} | {r['epochs']} | "
            f"{'yes' if r['stopped_early'] else 'no'} | {r['status']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "alpha_beta.png", metric)
    best = next((r for r in rows if r["metric"] is not None), None)
    if best is not None:
        overlay = {"stage1": {"alpha": float(best["alpha"]), "beta": float(best["beta"])}}
        header = (
            f"# Best of {len(rows)} trials by {metric} = {best['metric']:.4f} "
            f"({best['epochs']} of {max_epochs} epochs). Overlay it on the base config:\n"
            "#   allmrec train stage1 --config base.yaml --config best.yaml\n"
        )
        (out / "best.yaml").write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    return best


def _plot(rows: list[dict], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["metric"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if done:
        points = ax.scatter(
            [r["alpha"] for r in done],
            [r["beta"] for r in done],
            c=[r["metric"] for r in done],
            s=[60 + 20 * r["epochs"] for r in done],
            cmap="viridis",
            edgecolors=["red" if r["stopped_early"] else "black" for r in done],
        )
        fig.colorbar(points, label=metric)
        for r in done:
            ax.annotate(f"{r['metric']:.3f}", (r["alpha"], r["beta"]), fontsize=7)
    ax.set_xlabel("alpha (item reconstruction)")
    ax.set_ylabel("beta (text reconstruction)")
    ax.set_title("Stage 1 search (red edge: stopped early by ASHA)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
