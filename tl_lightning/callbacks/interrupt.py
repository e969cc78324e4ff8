"""A ``fit`` stopped by SIGTERM or SIGINT (Ctrl+C) prints the exact command that resumes it from
``checkpoints/last.ckpt`` (one line), and the CLI exits with 128 + the signal number (143 for SIGTERM, 130 for
SIGINT), so no scheduler or script mistakes a killed run for a finished one.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from typing import Optional, Sequence

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: the signal that stopped the last fit in this process (read and cleared by the CLI)
_stopped_by: list[int] = []


def take_stop_signal() -> Optional[int]:
    """The signal number that interrupted the last fit, once (None when it was not interrupted)."""
    return _stopped_by.pop() if _stopped_by else None


def resume_command(argv: Sequence[str], ckpt_path: str) -> str:
    """``argv`` (a ``fit`` command line) with its ``--ckpt_path`` replaced by ``ckpt_path``, as a shell line."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--ckpt_path":
            skip = True
            continue
        if not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join(["python", "-m", "tl_lightning", *args, f"--ckpt_path={ckpt_path}"])


class InterruptCheckpoint(L.Callback):
    """On SIGTERM/SIGINT during ``fit``: stop at the next batch boundary and say how to resume from ``last.ckpt``.

    ``last.ckpt`` is the state at the end of the last finished epoch (``BestCheckpoint`` writes it there, after
    the epoch's validation and history row). A stop never overwrites it with a mid-epoch state: Lightning resumes
    such a state with a fresh data order, and when the stop lands after the epoch's last training batch it skips
    that epoch's validation and history row, both silently. So a resumed run redoes the interrupted epoch from
    its start and its results equal an uninterrupted run's. In a single process the signal only sets a flag (a
    validation in progress finishes first); a second Ctrl+C stops at once. Under DDP, Lightning's own SIGTERM
    handling stops the run and the same ``last.ckpt`` applies.
    """

    def __init__(self, argv: Optional[Sequence[str]] = None):
        self.argv = list(argv) if argv is not None else list(sys.argv[1:])
        self.received: Optional[int] = None
        self.finished: Optional[tuple[int, int]] = None  # (epoch, global step) of the last finished epoch
        self.training_started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.finished, self.training_started = None, None, False
        if trainer.world_size == 1:  # installed after Lightning's handlers, which it restores when fit ends
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.received = signum

    def _stop_if_signalled(self) -> None:
        if self.received is not None:
            raise SIGTERMException()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run starts at the epoch after last.ckpt's; a fresh one has no finished epoch yet
        self.finished = (trainer.current_epoch - 1, trainer.global_step) if trainer.current_epoch > 0 else None
        self.training_started = True
        self._stop_if_signalled()  # the signal came during the last epoch's validation: its last.ckpt is written

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self._stop_if_signalled()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled()  # the signal came during the final epoch: stopped, not finished (no test run)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit":
            return
        if self.received is not None:
            signum = self.received
        elif isinstance(exception, SIGTERMException):
            signum = signal.SIGTERM
        elif isinstance(exception, KeyboardInterrupt):
            signum = signal.SIGINT
        else:
            return
        _stopped_by[:] = [int(signum)]
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, "last.ckpt")
        name = signal.Signals(signum).name
        where = (f"stopped in epoch {trainer.current_epoch} at step {trainer.global_step}" if self.training_started
                 else "stopped before training started")
        if os.path.exists(path) and (self.finished is not None or not self.training_started):
            if self.finished is not None:
                epoch, step = self.finished
                steps = trainer.global_step - step
                held = f"holds the end of epoch {epoch} (step {step})" + (f"; its {steps} later steps are redone"
                                                                        if steps else "")
            else:  # stopped while a resumed run was still setting up
                held = "holds the last finished epoch"
            print(f"{name}: {where}; {path} {held}; resume with: {resume_command(self.argv, path)}",
                  file=sys.stderr, flush=True)
        else:
            when = ", before the first epoch ended" if self.training_started else ""
            print(f"{name}: {where}{when}, so there is nothing to resume; rerun the command to start again.",
                  file=sys.stderr, flush=True)
