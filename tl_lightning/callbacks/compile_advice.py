"""One line that suggests ``--model.init_args.compile=true`` when a fit is long enough to repay its warm-up.

``torch.compile`` stays opt-in: its warm-up is long (204 s for EfficientNet-Lite0 on 2 CPU cores, measured by
``bench/perf.py``), and a short fit would lose time. After ``probe_batches`` training batches this callback times
them, projects the time the fit has left, and prints the suggestion once, on rank 0, when compiled steps at the
measured speed-up would save more than the warm-up costs. It reads only public trainer state, and the task
sequence's length where the method ends the fit itself (``task_schedule.sequence_epochs``).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.callbacks.task_schedule import sequence_epochs

#: measured on CPU by bench/perf.py (FineTune, EfficientNet-Lite0): steps/s compiled / eager, and the warm-up
SPEEDUP = 2.8
WARMUP_S = 204.0


def worth_compiling(step_s: float, batches_left: float, speedup: float = SPEEDUP,
                    warmup_s: float = WARMUP_S) -> bool:
    """Whether compiled steps save more time than the warm-up costs over ``batches_left`` batches."""
    if not math.isfinite(batches_left) or batches_left <= 0:
        return False
    saved = batches_left * step_s * (1 - 1 / speedup)
    return saved > 2 * warmup_s  # a margin: the speed-up differs between backbones and machines


def batches_left(trainer: "L.Trainer", pl_module: "L.LightningModule", seen: int) -> float:
    """Training batches the fit has left after ``seen``: the Trainer's plan, or the task sequence's when the method
    ends the fit itself (``task_schedule.sequence_epochs``: ICaRL's tasks x epochs_per_task, where a Trainer built
    without ``max_epochs`` plans Lightning's default 1,000)."""
    total = trainer.estimated_stepping_batches * trainer.accumulate_grad_batches
    planned = sequence_epochs(pl_module, trainer.datamodule)
    if planned:
        total = min(total, planned * trainer.num_training_batches)
    return total - seen


class CompileAdvice(L.Callback):
    """Times the first training batches of an eager fit and suggests ``compile`` when it would pay off."""

    def __init__(self, probe_batches: int = 20):
        self.probe_batches = probe_batches
        self.advice: Optional[str] = None
        self.left: Optional[float] = None  # training batches left when the probe ended
        self._seen = 0
        self._started: Optional[float] = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen, self._started, self.advice = 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._seen == 1 and self._started is None:  # the first batch pays one-off costs: time from the second
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._seen += 1
        if self._seen != self.probe_batches + 1 or getattr(pl_module, "compile_backbone", True):
            return
        step_s = (time.perf_counter() - self._started) / self.probe_batches
        self.left = left = batches_left(trainer, pl_module, self._seen)
        if worth_compiling(step_s, left):
            self.advice = (f"tip: this fit has about {left * step_s / 60:.0f} min of training left at "
                           f"{step_s:.2f} s per batch; --model.init_args.compile=true ran steps {SPEEDUP}x faster "
                           f"on CPU after a {WARMUP_S:.0f} s warm-up (bench/perf.py)")
            rank_zero_info(self.advice)
