"""iCaRL's report: the line and logger metrics of each finished task, and at the end of the fit
``incremental.json``, ``incremental_accuracy.png`` and ``accuracy_matrix.png`` (``incremental_metrics``).

``IncrementalReport`` is a mixin of ``ICaRL``: it reads the accuracy rows the task ends recorded (``rows``,
``seen_acc``, ``classes_seen``, ``class_order``, ``finished``) and the ``memory``.
"""
from __future__ import annotations

import json
import os

from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.atomic import write_text
from tl_lightning.methods.incremental_metrics import (flat_metrics, plot_accuracy_curve, plot_accuracy_matrices,
                                                      summarize)


class IncrementalReport:
    """Per-task lines and the run's report files."""

    def _log_task(self, task: int, result: dict) -> None:
        metrics = {"incremental/task": float(task), "incremental/classes_seen": float(self.classes_seen[-1])}
        for clf in ("nme", "cnn"):
            if result["seen"][clf] is not None:
                metrics[f"incremental/{clf}/seen_accuracy"] = result["seen"][clf]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        nme = result["seen"]["nme"]
        rank_zero_info(f"[iCaRL] task {task + 1}/{self.dm.num_tasks}: {self.classes_seen[-1]} classes seen, "
                       f"exemplars {len(self.memory)}, accuracy CNN {100 * result['seen']['cnn']:.1f}%"
                       + (f", NME {100 * nme:.1f}%" if nme is not None else ""))

    def summary(self) -> dict:
        return {clf: summarize(self.rows[clf], self.seen_acc[clf]) for clf in ("nme", "cnn")}

    def results(self) -> dict:
        if not self.rows["cnn"]:
            return {}
        return {"incremental": {"class_order": self.class_order, "classes_seen": self.classes_seen,
                                "tasks_finished": self.finished, "exemplars": len(self.memory),
                                **self.summary()}}

    def write_report(self, run_dir: str) -> None:
        """``incremental.json``, ``incremental_accuracy.png`` and ``accuracy_matrix.png`` in ``run_dir``; the
        scalar metrics also go to the configured loggers."""
        os.makedirs(run_dir, exist_ok=True)
        report = self.results()["incremental"]
        write_text(os.path.join(run_dir, "incremental.json"), json.dumps(report, indent=2))
        curves = {f"iCaRL {clf.upper()}": self.seen_acc[clf] for clf in ("nme", "cnn")}
        plot_accuracy_curve(self.classes_seen, curves, os.path.join(run_dir, "incremental_accuracy.png"))
        plot_accuracy_matrices({clf.upper(): self.rows[clf] for clf in ("nme", "cnn")},
                               os.path.join(run_dir, "accuracy_matrix.png"))
        scalars = flat_metrics(self.summary())
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)
