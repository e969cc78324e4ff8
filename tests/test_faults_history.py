"""Learning curves (issue 15, item 2): each history row holds its own epoch's training and validation metrics,
checked epoch by epoch against Lightning's own CSVLogger ``metrics.csv``; ``history.jsonl`` agrees."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers import FAST, REPO, read_metrics, run_cli


def csv_epochs(path: Path) -> dict[int, dict]:
    """Lightning's CSVLogger rows merged per epoch (train and val metrics are logged on separate rows)."""
    epochs: dict[int, dict] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            epoch = epochs.setdefault(int(row["epoch"]), {})
            epoch.update({k: float(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step")})
    return epochs


def test_history_matches_lightnings_metrics_csv_epoch_by_epoch(tmp_path):
    run, logs = tmp_path / "run", tmp_path / "csv"
    run_cli("fit", "--config", REPO / "configs/finetune/quickstart.yaml", *FAST, "--data.image_size=32",
            "--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--test_after_fit=false", f"--trainer.default_root_dir={run}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={logs}",
            "--trainer.callbacks+=tl_lightning.callbacks.history.HistoryStream")
    history = read_metrics(run)["history"]
    reference = csv_epochs(next(logs.rglob("metrics.csv")))
    assert [row["epoch"] for row in history] == sorted(reference) == [0, 1, 2]
    for row in history:
        ref = reference[row["epoch"]]
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6), (row["epoch"], key)
    # the rows differ from epoch to epoch (a one-epoch shift would repeat or drop a training value)
    assert len({row["train/loss"] for row in history}) == 3
    streamed = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [{k: r[k] for k in ("epoch", "train/loss", "val/acc")} for r in streamed] == \
        [{k: r[k] for k in ("epoch", "train/loss", "val/acc")} for r in history]
    # last.ckpt carries the complete history, including the last epoch's training values
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("ResultsWriter"))
    assert saved["epoch"] == 2 and len(state["history"]) == 3
    assert state["history"][-1]["train/loss"] == pytest.approx(history[-1]["train/loss"])


@pytest.mark.slow
def test_a_kill_between_the_history_row_and_last_ckpt_streams_each_epoch_once_after_the_resume(tmp_path):
    """A real SIGKILL at the end of epoch 2, after history.jsonl got its row and before last.ckpt (end of
    epoch 1) was replaced: the resumed run trains epoch 2 again and must not leave its row twice."""
    from fault_helpers import QUICK, cli

    run = tmp_path / "run"
    common = ("fit", *QUICK, "--trainer.limit_train_batches=3", "--test_after_fit=false", "--trainer.max_epochs=4",
              f"--trainer.default_root_dir={run}", "--trainer.callbacks+=tl_lightning.callbacks.history.HistoryStream")
    killed = cli(*common, "--trainer.callbacks+=tests.helpers.signal_at.SignalAt", "--trainer.callbacks.epoch=2",
                 "--trainer.callbacks.batch=0", "--trainer.callbacks.stage=epoch_end", "--trainer.callbacks.signum=9")
    assert killed.returncode == -9, killed.stderr[-3000:]
    streamed = [json.loads(line)["epoch"] for line in (run / "history.jsonl").read_text().splitlines()]
    assert streamed == [0, 1, 2], "the fault must land after epoch 2's row"
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1, "and before its last.ckpt"
    resumed = cli(*common, f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in read_metrics(run)["history"]]
