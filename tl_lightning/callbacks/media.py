"""Plots as logger media: the test confusion matrix, and every PNG a run writes into its run directory.

``ConfusionMatrix`` reads the logits the model's ``forward`` returns during ``test`` (a forward hook, so
nothing is computed twice) into torchmetrics' ``MulticlassConfusionMatrix``, which sums it over all ranks, and
writes ``<run dir>/confusion_matrix.png`` and
the counts in ``confusion_matrix.json`` (rank 0). ``log_run_media`` logs the run's PNGs (learning curves,
confusion and accuracy matrices, ...) to every logger that takes images, e.g. W&B; the CLI calls it when a
command has written its results.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from typing import Optional, Sequence

import lightning as L
import numpy as np
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from tl_lightning.atomic import save_figure, write_text
from tl_lightning.plots import log_image

CONFUSION_PNG = "confusion_matrix.png"
#: PNGs other callbacks log themselves (FeaturePlot)
SELF_LOGGED = ("features_*.png",)


class ConfusionMatrix(L.Callback):
    """Confusion matrix of the (first) test split of single-label tasks: rows = true class, columns = prediction."""

    def __init__(self, filename: str = CONFUSION_PNG):
        self.filename = filename
        self.matrix: Optional[torch.Tensor] = None  # the last test's counts
        self._metric: Optional[MulticlassConfusionMatrix] = None
        self._logits: Optional[torch.Tensor] = None
        self._hook = None

    def on_test_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self.matrix, self._metric = None, None
        if getattr(pl_module, "multilabel", False) or not getattr(pl_module, "num_classes", 0):
            return
        self._metric = MulticlassConfusionMatrix(num_classes=int(pl_module.num_classes)).to(pl_module.device)

        def keep_logits(module, inputs, output):
            self._logits = output if isinstance(output, torch.Tensor) else None

        self._hook = pl_module.register_forward_hook(keep_logits)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits, self._logits = self._logits, None
        if dataloader_idx != 0:  # the primary test split only (e.g. the target domain, not the source)
            return
        if self._metric is None or logits is None or not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return
        y = batch[1]
        n = self._metric.num_classes
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or logits.ndim != 2 or logits.shape != (len(y), n):
            return
        keep = (y >= 0) & (y < n)
        self._metric.update(logits.detach()[keep].argmax(1), y[keep])

    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._metric is None:
            return
        self.matrix = self._metric.compute()  # summed over every rank's share of the split
        self._metric = None
        if trainer.is_global_zero and int(self.matrix.sum()) > 0:
            names = list(getattr(pl_module, "class_names", None) or range(self.matrix.shape[0]))
            names = [str(n) for n in names]
            matrix = self.matrix.cpu().numpy()
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            path = os.path.join(trainer.default_root_dir, self.filename)
            write_text(os.path.splitext(path)[0] + ".json", json.dumps({"class_names": names, "matrix": matrix.tolist()}))
            plot_confusion_matrix(matrix, names, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str, max_labels: int = 40) -> str:
    """Row-normalised confusion matrix as a heatmap PNG (counts in the cells when there are few classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(matrix)
    rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = min(12.0, 3.0 + 0.4 * n)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= max_labels:
        ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n), class_names, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if rates[i, j] > 0.5 else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix (accuracy {accuracy:.3f}, n={int(matrix.sum())})")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def run_pngs(run_dir: str, since: float = 0.0, exclude: Sequence[str] = SELF_LOGGED) -> list[str]:
    """PNGs directly in ``run_dir`` written at or after ``since`` (a ``time.time()``), minus ``exclude`` patterns."""
    paths = sorted(glob.glob(os.path.join(glob.escape(run_dir), "*.png")))
    return [p for p in paths if os.path.getmtime(p) >= since
            and not any(fnmatch.fnmatch(os.path.basename(p), pat) for pat in exclude)]


def log_run_media(trainer: "L.Trainer", since: float = 0.0) -> list[str]:
    """Log the run's new PNGs as ``media/<name>`` to every image-capable logger (rank 0); returns the keys."""
    if not trainer.is_global_zero or not trainer.loggers:
        return []
    keys = []
    for path in run_pngs(trainer.default_root_dir, since):
        key = f"media/{os.path.splitext(os.path.basename(path))[0]}"
        if log_image(trainer, key, path):
            keys.append(key)
    return keys
