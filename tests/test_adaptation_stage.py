"""DomainAdaptation's source stage as ordinary epochs of the fit (issue 18): a real SIGTERM in the stage stops the
run at the next batch, the printed resume continues the stage (the network, or its ``teacher`` copy, with its
optimizer) and ends exactly like a run that was never stopped, and no stage epoch becomes the best checkpoint."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fault_helpers import cli, one_error

from helpers import FAST
from tl_lightning.callbacks.results import BestCheckpoint

CONFIG = "configs/adaptation/digits_offline.yaml"
STAGE = 2  # source-stage epochs; the fit adapts in epoch 2 only
ARGS = ("fit", "--config", CONFIG, *FAST, "--data.init_args.epoch=3",
        "--data.init_args.source.init_args.samples_per_class=20", "--trainer.limit_val_batches=2",
        "--trainer.max_epochs=3", f"--model.init_args.source_pretrain_epochs={STAGE}", "--test_after_fit=false",
        "--model.init_args.selection=target_acc")


def _fit(run, *extra):
    return cli(*ARGS, f"--trainer.default_root_dir={run}", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("init_from_source", [True, False], ids=["warm_start", "teacher_copy"])
def test_a_stop_in_the_source_stage_resumes_into_the_uninterrupted_run(tmp_path, init_from_source):
    flag = f"--model.init_args.init_from_source={str(init_from_source).lower()}"
    whole = _fit(tmp_path / "whole", flag)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "source stage done after 2 epochs: adaptation starts at epoch 2" in whole.stderr

    run = tmp_path / "stopped"
    stopped = _fit(run, flag, "--trainer.callbacks+=tests.helpers.signal_at.SignalAt", "--trainer.callbacks.epoch=1",
                   "--trainer.callbacks.batch=1")
    assert stopped.returncode == 143, stopped.stderr[-3000:]  # in the stage's second epoch, at its next batch
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and not bool(saved["state_dict"]["source_stage_done"])
    assert any(k.startswith("teacher.") for k in saved["state_dict"]) is (not init_from_source)
    assert len(saved["optimizer_states"]) == (2 if init_from_source else 3)
    assert "source stage done" not in stopped.stderr
    resumed = _fit(run, flag, f"--ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "whole", run))
    assert got["history"] == expected["history"] and [row["epoch"] for row in got["history"]] == [0, 1, 2]
    assert got["source_pretrain_loss"] == expected["source_pretrain_loss"] and len(got["source_pretrain_loss"]) == 2
    assert got["soft_labels"] == expected["soft_labels"]
    for d in (tmp_path / "whole", run):  # the stage's epochs are never the best checkpoint
        assert [p.name for p in (d / "checkpoints").glob("best-*.ckpt")] == ["best-02.ckpt"]
    state = {d: torch.load(d / "checkpoints" / "best-02.ckpt", weights_only=True)["state_dict"]
             for d in (tmp_path / "whole", run)}
    for key, value in state[tmp_path / "whole"].items():
        assert torch.allclose(value.float(), state[run][key].float(), atol=1e-6), key


def test_max_epochs_must_leave_epochs_to_adapt_after_the_source_stage(tmp_path, capsys):
    line = one_error(capsys, *ARGS, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2")
    assert "max_epochs (2) counts the 2 source_pretrain_epochs too" in line
    assert not (tmp_path / "checkpoints").exists()


class _LaterIsWorse(L.LightningModule):
    """val/acc falls every epoch, and the first two epochs are a stage that may not be chosen."""

    monitor = ("val/acc", "max")

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    @property
    def selectable(self) -> bool:
        return self.current_epoch >= STAGE

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", 1.0 - 0.1 * self.current_epoch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_best_checkpoint_never_comes_from_an_epoch_the_method_rules_out(tmp_path):
    data = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=1)
    L.Trainer(max_epochs=4, default_root_dir=tmp_path, callbacks=[BestCheckpoint()], logger=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              accelerator="cpu").fit(_LaterIsWorse(), data, data)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["best-02.ckpt", "last.ckpt"]
