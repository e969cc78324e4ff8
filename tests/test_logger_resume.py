"""A fit resumed with ``--ckpt_path`` continues the same W&B run (id stored in the checkpoint, two offline segments
of one run id, steps continuous, none twice) and the same TensorBoard and CSV version folders (every step once)."""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch

from fault_helpers import cli
from test_wandb import _history, wandb_records
from tl_lightning.callbacks.logger_resume import CHECKPOINT_KEY

pytestmark = pytest.mark.slow

QUICK = ("--config", "configs/quickstart.yaml", "--data.image_size=32", "--model.embedding=pooled",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0",
         "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=1")


def fit(run_dir: Path, *args: str) -> str:
    proc = cli("fit", *QUICK, f"--trainer.default_root_dir={run_dir}", *args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def two_segments(run_dir: Path, *args: str) -> str:
    """Fit 2 epochs, then resume from last.ckpt to 4 epochs; returns the second segment's output."""
    fit(run_dir, "--trainer.max_epochs=2", *args)
    return fit(run_dir, "--trainer.max_epochs=4", f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", *args)


def _segment(folder: Path) -> tuple[str, list[dict]]:
    records = list(wandb_records(next(folder.glob("run-*.wandb"))))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    return run.run_id, _history(records)


def test_resumed_fit_continues_the_same_wandb_run_without_repeating_steps(tmp_path):
    run_dir = tmp_path / "run"
    out = two_segments(run_dir, "--config", "configs/logger/wandb.yaml")
    segments = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(segments) == 2, segments
    (id1, rows1), (id2, rows2) = (_segment(s) for s in segments)
    assert id1 == id2 and segments[0].name.endswith(id1)  # one run id, two offline segments of it
    assert f"logging continues with wandb id {id1}" in out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt[CHECKPOINT_KEY]["wandb"] == id1

    def epochs(rows):  # global step of each validation epoch
        return [(int(r["epoch"]), int(r["trainer/global_step"])) for r in rows if "val/acc" in r]

    first, second = epochs(rows1), epochs(rows2)
    assert [e for e, _ in first] == [0, 1] and [e for e, _ in second] == [2, 3]  # the epochs go on, none again
    steps = [s for _, s in first + second]
    assert steps == sorted(set(steps))  # strictly increasing across both segments: no step logged twice
    per_epoch = steps[1] - steps[0]
    assert all(b - a == per_epoch for a, b in zip(steps, steps[1:]))  # continuous: no gap, no restart at 0
    train_steps1 = [r["trainer/global_step"] for r in rows1 if "train/loss" in r]
    train_steps2 = [r["trainer/global_step"] for r in rows2 if "train/loss" in r]
    assert train_steps2 and min(train_steps2) > max(train_steps1)


def test_resumed_fit_logs_into_the_same_tensorboard_version(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    out = two_segments(run_dir)  # no logger configured: Lightning's default, TensorBoard
    versions = sorted(p.name for p in (run_dir / "lightning_logs").iterdir())
    assert versions == ["version_0"]
    assert "logging continues with tensorboard version 0" in out
    events = EventAccumulator(str(run_dir / "lightning_logs" / "version_0"))
    events.Reload()
    steps = [e.step for e in events.Scalars("val/acc")]
    assert len(steps) == 4 and steps == sorted(set(steps))
    assert sorted({int(e.value) for e in events.Scalars("epoch") if e.step in steps}) == [0, 1, 2, 3]


STOPPABLE = ("fit", "--config", "configs/finetune/quickstart.yaml", "--data.image_size=32",
             "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", "--trainer.accelerator=cpu",
             "--trainer.devices=1", "--trainer.enable_progress_bar=false", "--data.num_workers=0",
             "--test_after_fit=false", "--trainer.max_epochs=4", "--trainer.log_every_n_steps=1")


def _fit_with_csv_and_tensorboard(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    loggers = ("--trainer.logger+=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run_dir}",
               "--trainer.logger.name=csv", "--trainer.logger+=lightning.pytorch.loggers.TensorBoardLogger",
               f"--trainer.logger.save_dir={run_dir}", "--trainer.logger.name=tb")
    return cli(*STOPPABLE, f"--trainer.default_root_dir={run_dir}", *loggers, *args, timeout=900)


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_stopped_mid_epoch_continues_its_csv_and_tensorboard_folders_without_repeats(tmp_path):
    """FineTune logs its learning rates every step: the stopped run logged step 6 of epoch 2, which the resumed run
    (from last.ckpt, the end of epoch 1, step 6) logs again. Each logger keeps one version folder, every step once,
    and the CSV equals the one of a run that was never stopped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    whole = _fit_with_csv_and_tensorboard(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "run"
    stopped = _fit_with_csv_and_tensorboard(run, "--trainer.callbacks+=tests.helpers.signal_at.SignalAt",
                                            "--trainer.callbacks.epoch=2", "--trainer.callbacks.batch=1")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    before = _csv(run / "csv" / "version_0" / "metrics.csv")
    assert max(int(r["step"]) for r in before) == 6  # epoch 2's first step, after last.ckpt's step 6
    resumed = _fit_with_csv_and_tensorboard(run, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "logging continues with csv version 0, tensorboard version 0" in resumed.stderr

    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    rows = _csv(run / "csv" / "version_0" / "metrics.csv")
    assert [int(r["step"]) for r in rows if r["lr/head"]] == list(range(12))  # every step once
    assert rows[:len(before) - 1] == before[:-1]  # the rows before the checkpoint's step are kept as written
    assert rows == _csv(tmp_path / "whole" / "csv" / "version_0" / "metrics.csv")

    assert [p.name for p in (run / "tb").iterdir()] == ["version_0"]
    events = EventAccumulator(str(run / "tb" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("lr/head")] == list(range(12))
    assert [e.step for e in events.Scalars("val/acc")] == [2, 5, 8, 11]


def test_a_run_stopped_mid_epoch_logs_each_step_once_in_its_wandb_run(tmp_path):
    """W&B cannot delete rows: the training rows are held until their epoch has ended, so the rows of the epoch the
    stopped run did not finish never reach W&B, and the resumed run (which redoes that epoch) logs each step once."""
    run = tmp_path / "run"
    wandb = ("--config", "configs/logger/wandb.yaml")
    stop = ("--trainer.callbacks+=tests.helpers.signal_at.SignalAt", "--trainer.callbacks.epoch=2",
            "--trainer.callbacks.batch=1")
    base = [*STOPPABLE, f"--trainer.default_root_dir={run}", *wandb]
    stopped = cli(*base, *stop, timeout=900)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    resumed = cli(*base, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    segments = sorted((run / "wandb").glob("offline-run-*"))
    assert len(segments) == 2, segments
    (id1, rows1), (id2, rows2) = (_segment(s) for s in segments)
    assert id1 == id2
    # the stopped segment sent epochs 0 and 1 (steps 0-5), nothing of epoch 2 (its step 6 was held, then dropped)
    assert [int(r["trainer/global_step"]) for r in rows1 if "lr/head" in r] == list(range(6))
    rows = rows1 + rows2
    assert [int(r["trainer/global_step"]) for r in rows if "lr/head" in r] == list(range(12))  # each step once
    assert [int(r["epoch"]) for r in rows if "val/acc" in r] == [0, 1, 2, 3]
