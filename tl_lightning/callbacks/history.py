"""A live per-epoch metric stream: ``<run dir>/history.jsonl``, one JSON line per finished epoch (rank 0).

The local sweep runner (``tl_lightning.sweep``) reads it while a trial runs, which is what W&B's early
termination (hyperband) needs; ``metrics.json`` only appears when a run ends. A row is written before the epoch's
``last.ckpt`` (checkpoint callbacks run last), so a run killed between the two has a row that its resume will
write again: when training starts, the rows after the step it starts from are dropped (``trim_history``).
"""
from __future__ import annotations

import json
import os

import lightning as L

from tl_lightning.atomic import write_text
from tl_lightning.callbacks.results import EpochEnd

HISTORY_FILE = "history.jsonl"


class HistoryStream(EpochEnd):
    """Appends each finished epoch's scalar metrics (training and validation) to ``<run dir>/history.jsonl``."""

    def __init__(self, filename: str = HISTORY_FILE):
        self.filename = filename

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.is_global_zero:  # the checkpoint (if any) is restored: epochs after it are trained again
            trim_history(trainer.default_root_dir, trainer.global_step, self.filename)

    def record(self, trainer: "L.Trainer", row: dict) -> None:
        if not trainer.is_global_zero:
            return
        row = {"epoch": row.pop("epoch"), "step": trainer.global_step, **row}
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, self.filename), "a") as f:
            f.write(json.dumps(row) + "\n")


def read_history(run_dir: str, filename: str = HISTORY_FILE) -> list[dict]:
    """The rows written so far (a partly written last line is skipped)."""
    rows = []
    try:
        with open(os.path.join(run_dir, filename)) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return rows


def trim_history(run_dir: str, step: int, filename: str = HISTORY_FILE) -> None:
    """Keep the rows up to ``step`` (the state a run restarts from; -1 drops every row), rewritten atomically."""
    path = os.path.join(run_dir, filename)
    if not os.path.exists(path):
        return
    rows = read_history(run_dir, filename)
    kept = [r for r in rows if int(r.get("step", 0)) <= step]
    if len(kept) != len(rows):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
