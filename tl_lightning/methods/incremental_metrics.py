"""Class-incremental metrics and plots: the accuracy matrix ``R[i][j]`` (accuracy on task ``j`` after training
task ``i``), average incremental accuracy (the mean over steps of the accuracy on all classes seen so far, as
reported by iCaRL, Rebuffi et al. 2017), last accuracy, and forgetting (Chaudhry et al., "Riemannian Walk",
ECCV 2018: the best earlier accuracy on a task minus its final accuracy, averaged over all but the last task).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from tl_lightning.atomic import save_figure


def forgetting(matrix: list[list[Optional[float]]]) -> Optional[float]:
    """Average forgetting of the tasks before the last one (None with fewer than two rows)."""
    rows = len(matrix)
    if rows < 2 or any(v is None for r in matrix for v in r):
        return None
    drops = [max(matrix[i][j] for i in range(j, rows - 1)) - matrix[rows - 1][j] for j in range(rows - 1)]
    return float(np.mean(drops))


def summarize(matrix: list[list[Optional[float]]], seen_accuracy: list[Optional[float]]) -> dict:
    """The scalar metrics of one classifier from its accuracy matrix rows and its accuracy on the seen classes."""
    complete = bool(seen_accuracy) and all(a is not None for a in seen_accuracy)
    return {
        "accuracy_matrix": matrix,
        "seen_accuracy": seen_accuracy,
        "average_incremental_accuracy": float(np.mean(seen_accuracy)) if complete else None,
        "last_accuracy": seen_accuracy[-1] if seen_accuracy else None,
        "forgetting": forgetting(matrix),
    }


def flat_metrics(summary: dict, prefix: str = "incremental") -> dict[str, float]:
    """Scalars of ``summary`` (``{classifier: summarize(...)}``) for a logger, e.g.
    ``incremental/nme/last_accuracy``."""
    out = {}
    for clf, s in summary.items():
        for key in ("average_incremental_accuracy", "last_accuracy", "forgetting"):
            if isinstance(s.get(key), float) and not math.isnan(s[key]):
                out[f"{prefix}/{clf}/{key}"] = s[key]
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_curve(classes_seen: list[int], curves: dict[str, list[Optional[float]]], path: str,
                        title: str = "class-incremental accuracy") -> None:
    """Accuracy on all classes seen so far vs the number of classes seen, one line per classifier/method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, acc in curves.items():
        pts = [(c, a) for c, a in zip(classes_seen, acc) if a is not None]
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("classes seen")
    ax.set_ylabel("accuracy on seen classes (%)")
    ax.set_title(title)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_accuracy_matrices(matrices: dict[str, list[list[Optional[float]]]], path: str) -> None:
    """Heatmaps of ``R[i][j]`` (rows: after task i, columns: task j), one panel per classifier."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], matrices.items()):
        n = len(rows)
        grid = np.full((n, n), np.nan)
        for i, row in enumerate(rows):
            for j, v in enumerate(row[: i + 1]):
                grid[i, j] = np.nan if v is None else 100 * v
        ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for i in range(n):
            for j in range(i + 1):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < 60 else "black")
        ax.set_title(f"{name}: accuracy (%) on task j")
        ax.set_xlabel("task j")
        ax.set_ylabel("after task i")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
