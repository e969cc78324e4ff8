"""``predict`` output: a CSV of file, predicted class name and score per image, in the run directory.

``python -m tl_lightning predict --config CFG --ckpt_path BEST.ckpt --data.predict_dir=NEW_IMAGES`` classifies
every image under ``NEW_IMAGES`` (without it, the test split) and writes ``<run dir>/predictions.csv``. The
method's ``predict_step`` returns ``pred``, ``score`` and ``probs``; class names come from the model (linked
from the DataModule). Multi-label tasks also get a ``labels`` column: every class with probability >= 0.5.
"""
from __future__ import annotations

import csv
import os
from typing import Optional

import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from tl_lightning.atomic import atomic_open

PREDICTIONS_FILE = "predictions.csv"


class PredictionWriter(BasePredictionWriter):
    """Collects each predicted batch and writes ``predictions.csv``; under DDP rank 0 writes every rank's rows."""

    def __init__(self, filename: str = PREDICTIONS_FILE, threshold: float = 0.5):
        super().__init__(write_interval="batch")
        self.filename = filename
        self.threshold = threshold
        self.rows: dict[int, list] = {}
        self.path: Optional[str] = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.rows = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if not isinstance(prediction, dict) or not {"pred", "score"} <= set(prediction) or prediction["pred"].ndim != 1:
            return  # a method with its own prediction format
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        dataset = loader.dataset
        names = list(getattr(pl_module, "class_names", None) or [])
        multilabel = bool(getattr(pl_module, "multilabel", False))
        preds = prediction["pred"].tolist()
        scores = prediction["score"].float().tolist()
        probs = prediction["probs"].float().tolist() if multilabel else None
        indices = list(batch_indices) if batch_indices else range(batch_idx * len(preds), (batch_idx + 1) * len(preds))
        for k, (i, pred, score) in enumerate(zip(indices, preds, scores)):
            i = int(i)
            file = dataset.describe(i) if hasattr(dataset, "describe") else str(i)
            name = names[pred] if pred < len(names) else str(pred)
            row = [file, name, f"{score:.6f}"]
            if multilabel:
                row.append(";".join(n for n, p in zip(names, probs[k]) if p >= self.threshold))
            self.rows[i] = row  # keyed by index: a distributed sampler's padding repeats samples

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        super().on_predict_epoch_end(trainer, pl_module)
        rows = self._gather(trainer)
        if not rows or not trainer.is_global_zero:
            return
        run_dir = trainer.default_root_dir
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, self.filename)
        header = ["file", "class", "score"] + (["labels"] if getattr(pl_module, "multilabel", False) else [])
        with atomic_open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows[i] for i in sorted(rows))
        print(f"wrote {len(rows)} predictions to {self.path}", flush=True)

    def _gather(self, trainer) -> dict[int, list]:
        """Every rank's rows by sample index (a distributed sampler's padding repeats samples: kept once)."""
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return self.rows
        parts: list = [None] * trainer.world_size
        dist.all_gather_object(parts, self.rows)  # every rank calls it, with rows or without
        return {i: row for part in parts for i, row in part.items()}
