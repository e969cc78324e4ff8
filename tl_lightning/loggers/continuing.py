"""CSV and TensorBoard loggers that a resumed ``fit`` continues in the same version folder, without repeats.

A resumed run starts at its checkpoint's global step S (``last.ckpt`` is an epoch end). The run that was stopped
may have logged steps S, S+1, ... of the epoch it did not finish; the resumed run logs them again. Both loggers
take ``purge_step=S``: everything the earlier segment logged at a step >= S is dropped, so every step appears
once. The CLI sets ``version`` and ``purge_step`` from the checkpoint (``callbacks/logger_resume.py``).

- ``CSVLogger``: Lightning's writer deletes the ``metrics.csv`` it finds in its version folder; this one keeps
  the rows before S (rewritten atomically) and appends after them. Without ``purge_step`` it keeps every row.
- ``TensorBoardLogger``: passes ``purge_step`` to TensorBoard's ``SummaryWriter``, whose readers then discard the
  earlier events at steps >= S.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Optional, Union

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from tl_lightning.atomic import write_text


def _csv_text(fieldnames: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class ContinuingCSVWriter(ExperimentWriter):
    """Lightning's CSV experiment writer that keeps an existing ``metrics.csv`` (its rows before ``purge_step``)."""

    def __init__(self, log_dir: str, purge_step: Optional[int] = None):
        self.purge_step = purge_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__: keep the file instead of deleting it
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if self.purge_step is None or int(row["step"]) < self.purge_step]
        self.metrics_keys = sorted(header)
        write_text(self.metrics_file_path, _csv_text(self.metrics_keys, rows))

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:  # atomically, unlike Lightning's
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        write_text(self.metrics_file_path, _csv_text(fieldnames, rows))


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` that continues an existing version folder (see the module docstring)."""

    purge_step: Optional[int] = None

    def __init__(self, save_dir: str, name: Optional[str] = "lightning_logs", version: Optional[Union[int, str]] = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100, purge_step: Optional[int] = None):
        """
        Args:
            save_dir, name, version, prefix, flush_logs_every_n_steps: as Lightning's ``CSVLogger``.
            purge_step: drop the rows an earlier segment of this version logged at this step or later.
        """
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.purge_step = purge_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuingCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuingCSVWriter(self.log_dir, self.purge_step)
        return self._experiment


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` with ``purge_step`` (see the module docstring)."""

    purge_step: Optional[int] = None

    def __init__(self, save_dir: str, name: Optional[str] = "lightning_logs",
                 version: Optional[Union[int, str]] = None, log_graph: bool = False, default_hp_metric: bool = True,
                 prefix: str = "", sub_dir: Optional[str] = None, purge_step: Optional[int] = None, **kwargs: Any):
        """
        Args:
            save_dir, name, version, log_graph, default_hp_metric, prefix, sub_dir: as Lightning's.
            purge_step: TensorBoard discards the events an earlier segment of this version logged at this step or
                later (``SummaryWriter(purge_step=...)``).
            **kwargs: more ``SummaryWriter`` arguments.
        """
        if purge_step is not None:
            kwargs["purge_step"] = purge_step
        super().__init__(save_dir, name=name, version=version, log_graph=log_graph,
                         default_hp_metric=default_hp_metric, prefix=prefix, sub_dir=sub_dir, **kwargs)
        self.purge_step = purge_step
