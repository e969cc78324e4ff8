"""A test callback that holds a sweep trial at the start of a chosen epoch until the test lets it go.

The trial's run folder (``TL_SWEEP_RUN_DIR``) gets ``gate.reached`` when the trial named ``TL_TEST_GATE_TRIAL``
starts epoch ``TL_TEST_GATE_EPOCH`` (after the previous epoch's ``last.ckpt``); it then waits for ``gate.open``.
A test kills the sweep runner once ``gate.reached`` exists: a deterministic kill point, no timing involved.
"""
from __future__ import annotations

import os
import time

import lightning as L


class Gate(L.Callback):
    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        run_dir = os.environ.get("TL_SWEEP_RUN_DIR", "")
        if os.path.basename(run_dir) != os.environ.get("TL_TEST_GATE_TRIAL") \
                or str(trainer.current_epoch) != os.environ.get("TL_TEST_GATE_EPOCH"):
            return
        with open(os.path.join(run_dir, "gate.reached"), "w") as f:
            f.write(str(trainer.current_epoch))
        deadline = time.monotonic() + 900  # a safety net only: the test kills this process long before
        while not os.path.exists(os.path.join(run_dir, "gate.open")) and time.monotonic() < deadline:
            time.sleep(0.05)
