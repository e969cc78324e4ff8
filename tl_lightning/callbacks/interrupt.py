"""A ``fit`` stopped by SIGTERM or SIGINT (Ctrl+C) saves ``checkpoints/last.ckpt``, prints the exact command that
resumes it (one line), and the CLI exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), so no
scheduler or script mistakes a killed run for a finished one.
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
    """On SIGTERM/SIGINT during ``fit``: save ``last.ckpt`` where the checkpoint callback keeps it, say how to resume.

    In a single process the signal only sets a flag; the run stops at the next training-batch boundary, so a
    validation in progress finishes and the epoch's history row and last.ckpt are written first, and the saved
    state resumes cleanly. A second Ctrl+C stops at once. Under DDP, Lightning's own SIGTERM handling applies.
    """

    def __init__(self, argv: Optional[Sequence[str]] = None):
        self.argv = list(argv) if argv is not None else list(sys.argv[1:])
        self.received: Optional[int] = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        if trainer.world_size == 1:  # installed after Lightning's handlers, which it restores when fit ends
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl+C: stop now
        self.received = signum

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.received is not None:
            raise SIGTERMException()

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
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or os.path.join(trainer.default_root_dir, "checkpoints")
        path = os.path.join(folder, "last.ckpt")
        if trainer.world_size == 1:  # under DDP the other processes are gone: keep the epoch-end last.ckpt
            if ckpt is not None and getattr(ckpt, "save_last", False):
                ckpt.last_model_path = path  # so the resumed run keeps writing last.ckpt, not last-v1.ckpt
            trainer.save_checkpoint(path)
        if not trainer.is_global_zero:
            return
        name = signal.Signals(signum).name
        if os.path.exists(path):
            print(f"{name}: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}; saved {path}; "
                  f"resume with: {resume_command(self.argv, path)}", file=sys.stderr, flush=True)
        else:
            print(f"{name}: stopped before any checkpoint was saved; rerun the command to start again.",
                  file=sys.stderr, flush=True)
