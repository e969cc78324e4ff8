"""Epoch values logged once per loop run (``methods/epoch_logging.py``) equal the means over every step and every
evaluated item, in every epoch, and a NaN loss shows as NaN."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from tl_lightning.data import DigitsDataModule
from tl_lightning.methods import FineTune
from tl_lightning.methods.base import task_loss
from tl_lightning.methods.epoch_logging import BatchWeightedMean


def test_batch_weighted_mean_weights_each_batch_by_its_size_and_keeps_nan():
    mean = BatchWeightedMean()
    mean.update(torch.tensor(1.0), 3)
    mean.update(torch.tensor(4.0), 1)
    assert mean.compute().item() == pytest.approx(1.75)  # (3 * 1 + 4) / 4, not (1 + 4) / 2
    mean.update(torch.tensor(float("nan")), 2)
    assert math.isnan(mean.compute().item())


class StepLosses(L.Callback):
    """Each training step's loss and batch size, and each epoch's logged values."""

    def __init__(self):
        self.steps: list[list[tuple[float, int]]] = []
        self.epochs: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.steps.append([])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1].append((outputs["loss"].item(), len(batch[1])))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_every_epoch_logs_the_mean_of_its_steps_and_of_its_validation_items(tmp_path):
    torch.manual_seed(0)
    # 60 training images in batches of 25: the last holds 10, so an unweighted mean of batch means differs
    dm = DigitsDataModule(batch_size=25, image_size=32, samples_per_class=6, num_workers=0, augment=False,
                          val_fraction=0.1, test_fraction=0.1, seed=0)
    model = FineTune(backbone="digit_cnn", weights="none", unfreeze="no_freeze", num_classes=10, lr=1e-2)
    record = StepLosses()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert len(record.epochs) == 3
    sizes = [n for _, n in record.steps[0]]
    assert len(set(sizes)) == 2  # a smaller last batch
    for steps, logged in zip(record.steps, record.epochs):
        weighted = sum(loss * n for loss, n in steps) / sum(n for _, n in steps)
        assert logged["train/loss"] == pytest.approx(weighted, rel=1e-5)
        assert "train/acc" in logged and "val/acc" in logged
    assert len({e["train/loss"] for e in record.epochs}) == 3  # each epoch its own value, none carried over

    # the last validation ran on the final weights: its values are those of the whole validation split
    model.eval()
    with torch.no_grad():
        batches = [(model(x), y) for x, y in dm.val_dataloader()]
    logits, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert record.epochs[-1]["val/loss"] == pytest.approx(task_loss(logits, targets, False).item(), rel=1e-5)
    assert record.epochs[-1]["val/acc"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
