"""A killed fit (issue 15, item 4): a real SIGTERM / SIGINT to a real ``fit`` subprocess exits non-zero (143 / 130),
leaves a loadable ``last.ckpt`` and prints one line whose command resumes the run in the same run folder."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import QUICK, cli, experiment_overlay
from helpers.launch import launch


def loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def wait_for(predicate, proc: subprocess.Popen, what: str, limit_s: float = 600) -> None:
    """Poll a handshake (a file the run writes); the limit is only a safety net for a hung run."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.output()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} after {limit_s} s")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_killed_fit_exits_nonzero_saves_last_and_prints_the_resume_command(tmp_path, signum, code):
    root = tmp_path / "exp"
    args = ["fit", *QUICK, "--config", experiment_overlay(tmp_path, root), "--trainer.max_epochs=10000",
            "--test_after_fit=false"]
    proc = launch(*args)
    last = root / "latest" / "checkpoints" / "last.ckpt"
    wait_for(lambda: last.exists() and loadable(last), proc, "the first epoch's last.ckpt")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-3000:]
    lines = [ln for ln in err.splitlines() if "resume with:" in ln]
    assert len(lines) == 1 and lines[0].startswith(signal.Signals(signum).name), err[-3000:]
    run = Path(os.path.realpath(root / "latest"))
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] >= 2 and not (run / "metrics.json").exists()
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))

    # the printed command resumes the same run (same folder), here capped two epochs after the saved one
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[:4] == ["python", "-m", "tl_lightning", "fit"]
    assert command[-1] == f"--ckpt_path={root / run.name / 'checkpoints' / 'last.ckpt'}"
    stop = saved["epoch"] + 2
    done = cli(*command[3:], f"--trainer.max_epochs={stop}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in root.iterdir()) == sorted([run.name, "latest"])
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(stop))
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))


STOP = ("fit", *QUICK, "--trainer.limit_train_batches=3", "--test_after_fit=false")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """The history of a run that trained 4 epochs without a stop."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = cli(*STOP, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())["history"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, epoch, batch, finished", [
    ("train", 2, 1, 1),  # mid-epoch
    ("train", 2, 2, 1),  # the epoch's last training batch, before its validation (once lost epoch 2's row)
    ("val", 2, 0, 2),    # during the epoch's validation: it finishes and last.ckpt holds epoch 2
])
def test_a_resume_after_a_stop_anywhere_in_an_epoch_equals_the_uninterrupted_run(tmp_path, uninterrupted, stage,
                                                                                  epoch, batch, finished):
    run = tmp_path / "run"
    stopped = cli(*STOP, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4",
                  "--trainer.callbacks+=tests.helpers.signal_at.SignalAt", f"--trainer.callbacks.epoch={epoch}",
                  f"--trainer.callbacks.batch={batch}", f"--trainer.callbacks.stage={stage}")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == finished and saved["global_step"] == 3 * (finished + 1)  # an epoch end, never mid-epoch
    assert f"holds the end of epoch {finished} (step {3 * (finished + 1)})" in stopped.stderr
    resumed = cli(*STOP, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4", f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # every epoch once, with the values of the run that was never stopped (same data order: RandomState)
    assert json.loads((run / "metrics.json").read_text())["history"] == uninterrupted


@pytest.mark.slow
def test_a_stop_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path):
    run = tmp_path / "run"
    stopped = cli(*STOP, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=4",
                  "--trainer.callbacks+=tests.helpers.signal_at.SignalAt", "--trainer.callbacks.epoch=0",
                  "--trainer.callbacks.batch=1", f"--trainer.callbacks.signum={int(signal.SIGINT)}")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "SIGINT: stopped in epoch 0 at step 2, before the first epoch ended, so there is nothing to resume; " \
           "rerun the command to start again." in stopped.stderr
    assert not (run / "checkpoints" / "last.ckpt").exists() and not (run / "metrics.json").exists()
