"""Run results: the best checkpoint, learning curves, a results table and ``metrics.json``.

Everything is written into the run directory (``trainer.default_root_dir``) by global rank 0 only.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tl_lightning.atomic import save_figure, write_text

METRICS_FILE = "metrics.json"


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def run_checkpoint(trainer: "L.Trainer") -> Optional[ModelCheckpoint]:
    """The checkpoint callback whose best checkpoint is the run's: ``BestCheckpoint`` (the method's own metric),
    not whichever ``ModelCheckpoint`` comes first (``trainer.checkpoint_callback``), so a checkpoint callback a
    user adds never changes which checkpoint is tested and reported."""
    callbacks = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    return next((c for c in callbacks if isinstance(c, BestCheckpoint)), callbacks[0] if callbacks else None)


class BestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that monitors the method's own metric and writes to ``<run dir>/checkpoints``.

    ``last.ckpt`` is written by this class (``save_last``), through public APIs only, once per epoch at the end of
    the training epoch: after the epoch's training metrics exist and ``ResultsWriter`` recorded the epoch's history
    row, so a resume neither repeats epochs nor loses the row of the last epoch (Lightning's own ``save_last``
    refreshes ``last.ckpt`` only together with a top-k save since 2.5, and after validation, before the row).
    An epoch the method rules out (``selectable`` false, e.g. a stage before its model trains) is never a top-k
    candidate; its ``last.ckpt`` is written as any other. Of two epochs with the same score the earlier stays the
    best, unless the method's ``later_ties_win`` says the later should (e.g. a one-standard-error rule).
    """

    def __init__(self, save_last: bool = True, **kwargs):
        kwargs.setdefault("filename", "best-{epoch:02d}")
        kwargs.setdefault("auto_insert_metric_name", False)
        super().__init__(save_last=False, **kwargs)
        self.write_last = save_last
        self._own_monitor = kwargs.get("monitor") is None
        self.later_ties_win = False

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if self._own_monitor and hasattr(pl_module, "monitor"):
            self.monitor, self.mode = pl_module.monitor
            self.kth_value, self.kth_best_model_path = (torch.tensor(-math.inf if self.mode == "max" else math.inf), "")
            self.best_model_score = None
            self.later_ties_win = bool(getattr(pl_module, "later_ties_win", False))
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def check_monitor_top_k(self, trainer: "L.Trainer", current: Optional[torch.Tensor] = None) -> bool:
        if self.later_ties_win and current is not None and self.save_top_k == 1 and self.best_k_models:
            tie = bool(torch.eq(current, self.best_k_models[self.kth_best_model_path]))
            if trainer.strategy.reduce_boolean_decision(tie):  # every rank agrees (they log the same value)
                return True
        return super().check_monitor_top_k(trainer, current)

    @property
    def latest_is_best(self) -> bool:
        """No metric to rank by (``monitor`` None, e.g. ICaRL, whose accuracy falls as classes arrive): the best
        checkpoint is the latest, so it is ``last.ckpt`` itself rather than a second copy of the same state."""
        return self.monitor is None and self.save_top_k == 1 and self.write_last

    def on_validation_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if getattr(pl_module, "selectable", True) and not self.latest_is_best:
            super().on_validation_end(trainer, pl_module)  # the top-k save (after validation, or at the epoch's end)

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        selectable = getattr(pl_module, "selectable", True)
        if selectable and not self.latest_is_best:
            super().on_train_epoch_end(trainer, pl_module)
        if self.write_last and not trainer.fast_dev_run and not trainer.sanity_checking:
            path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)  # every rank: rank 0 writes
            self.last_model_path = path
            if selectable and self.latest_is_best:
                self.best_model_path = path


def epoch_row(trainer: "L.Trainer", validated: bool) -> dict:
    """The finished epoch's scalar metrics; validation ones (``val/...``) only when validation ran in it."""
    row = {"epoch": trainer.current_epoch}
    for key, value in trainer.callback_metrics.items():
        value = _plain(value)
        if value.__class__ in (int, float) and (validated or not key.startswith("val/")):
            row[key] = value
    return row


class EpochEnd(L.Callback):
    """Calls ``record(trainer)`` once per training epoch, after its training and its validation metrics exist."""

    validated = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.validated = False

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.record(trainer, epoch_row(trainer, self.validated))

    def record(self, trainer: "L.Trainer", row: dict) -> None:
        raise NotImplementedError


class ResultsWriter(EpochEnd):
    """Records per-epoch metrics and, at the end of a command, prints a table and writes ``metrics.json``."""

    def __init__(self, plot: bool = True):
        self.plot = plot
        self.history: list[dict] = []
        self.started = time.perf_counter()

    def setup(self, trainer, pl_module, stage: str) -> None:
        # setup runs before a resumed fit restores the history (load_state_dict); on_fit_start runs after it
        self._stage = stage
        if stage == "fit":
            self.history = []

    def record(self, trainer, row: dict) -> None:
        self.history.append(row)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        # only a resumed fit continues the history; testing the best checkpoint after fit keeps the full one
        if getattr(self, "_stage", "fit") == "fit":
            self.history = list(state_dict.get("history", []))

    def write(self, trainer: "L.Trainer", command: str, metrics: dict, config_path: Optional[str],
              wall_time_s: float, extra: Optional[dict] = None) -> Optional[str]:
        """Write ``metrics.json`` (atomically) and the learning-curve plot; print the results table."""
        if not trainer.is_global_zero:
            return None
        run_dir = trainer.default_root_dir
        os.makedirs(run_dir, exist_ok=True)
        ckpt = run_checkpoint(trainer)
        payload = {
            "command": command,
            "metrics": {k: _plain(v) for k, v in sorted(metrics.items())},
            "best_checkpoint": (ckpt.best_model_path or None) if ckpt else None,
            "best_score": _plain(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None,
            "config": config_path,
            "wall_time_s": round(wall_time_s, 3),
            "epochs": trainer.current_epoch,
            "history": self.history,
        }
        payload.update(extra or {})
        path = os.path.join(run_dir, METRICS_FILE)
        write_text(path, json.dumps(payload, indent=2, default=_plain))
        if self.plot and self.history:
            plot_learning_curves(self.history, os.path.join(run_dir, "learning_curves.png"))
        print_results_table(payload, path)
        return path


def print_results_table(payload: dict, path: str) -> None:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in payload["metrics"].items()
            if isinstance(v, (int, float))]
    rows += [(k, str(v)) for k, v in (payload.get("summary") or {}).items()]  # e.g. the recipe auto chose
    rows += [("wall time (s)", f"{payload['wall_time_s']:.1f}")]
    if payload.get("best_checkpoint"):
        rows.append(("best checkpoint", payload["best_checkpoint"]))
    if payload.get("test_checkpoint"):
        rows.append(("tested", payload["tested_checkpoint"] or "the final weights (no checkpoint file)"))
    rows.append(("metrics.json", path))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    print(f"\nResults ({payload['command']})\n{line}")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    print(line, flush=True)


def plot_learning_curves(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in history for k in row if k != "epoch" and not k.startswith("lr")})
    losses = [k for k in keys if k.endswith("loss")]
    scores = [k for k in keys if not k.endswith("loss")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, group, title in ((axes[0], losses, "loss"), (axes[1], scores, "metric")):
        for k in group:
            pts = [(r["epoch"], r[k]) for r in history if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if group:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
