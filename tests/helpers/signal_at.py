"""``SignalAt``: a run sends itself a real signal at an exact point of its training loop.

A signal from outside lands wherever the run happens to be; this callback puts it at a chosen batch of a chosen
epoch, in training (``stage="train"``) or in validation (``stage="val"``), so a test can cover the places where a
stop behaves differently: mid-epoch, on the epoch's last training batch (before its validation), and during the
validation. It fires once, before the batch runs. ``stage="epoch_end"`` fires at the end of the chosen training epoch
(``batch`` is ignored), after the callbacks listed before it and before the checkpoint callbacks, which Lightning
runs last: with SIGKILL, a run dies between an epoch's history row and its ``last.ckpt``. Add it from the command
line:
``--trainer.callbacks+=tests.helpers.signal_at.SignalAt --trainer.callbacks.epoch=2 --trainer.callbacks.batch=1``.
"""
from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    def __init__(self, epoch: int, batch: int, stage: str = "train", signum: int = int(signal.SIGTERM)):
        if stage not in ("train", "val", "epoch_end"):
            raise ValueError(f"stage must be 'train', 'val' or 'epoch_end', not {stage!r}")
        self.epoch, self.batch, self.stage, self.signum = epoch, batch, stage, signum
        self.sent = False

    def _maybe_send(self, trainer: L.Trainer, stage: str, batch_idx: int) -> None:
        if not self.sent and (stage, trainer.current_epoch, batch_idx) == (self.stage, self.epoch, self.batch):
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_send(trainer, "train", batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._maybe_send(trainer, "epoch_end", self.batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._maybe_send(trainer, "val", batch_idx)
