"""``HoldUntilSignal``: a training run that waits at a known point until a signal has reached it.

A test that interrupts a real run (SLURM's SIGUSR1 requeue, a kill) must not race the run: a fast machine could
finish training before the signal lands, a busy one could deliver it before the first checkpoint. This callback
removes the race. After ``hold_epoch``'s first training batch it writes ``<marker_dir>/holding-rank<R>`` and waits,
inside the training loop, until the signal's handler has run in this process; the run then goes on and the code
under test acts on the signal at its next batch boundary. The run is held only once, and not at all in a SLURM
job's restart (``SLURM_RESTART_COUNT`` > 0), so a requeued job trains straight through. Add it from the command
line: ``--trainer.callbacks+=tests.helpers.hold.HoldUntilSignal --trainer.callbacks.marker_dir=DIR``.
"""
from __future__ import annotations

import os
import signal
import time

import lightning as L


class HoldUntilSignal(L.Callback):
    def __init__(self, marker_dir: str, hold_epoch: int = 1, signum: int = int(signal.SIGUSR1),
                 safety_timeout_s: float = 900.0):
        self.marker_dir = marker_dir
        self.hold_epoch = hold_epoch
        self.signum = signum
        self.safety_timeout_s = safety_timeout_s
        self.received = False
        self.held = False
        self._chained = None

    def _on_signal(self, signum, frame) -> None:
        self.received = True
        if callable(self._chained):
            self._chained(signum, frame)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.held or trainer.current_epoch < self.hold_epoch or int(os.environ.get("SLURM_RESTART_COUNT", 0)):
            return
        self.held = True
        # chain onto the handler in place now, after every callback's setup (e.g. SLURMRequeue's), so the code
        # under test still gets the signal; installed before the marker is written, so no signal is missed
        self._chained = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        os.makedirs(self.marker_dir, exist_ok=True)
        marker = os.path.join(self.marker_dir, f"holding-rank{trainer.global_rank}")
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        deadline = time.monotonic() + self.safety_timeout_s
        while not self.received:  # the handler runs in this (main) thread, between these sleeps
            if time.monotonic() > deadline:
                raise RuntimeError(f"HoldUntilSignal: no signal {self.signum} within {self.safety_timeout_s} s")
            time.sleep(0.05)
        signal.signal(self.signum, self._chained if self._chained is not None else signal.SIG_DFL)
