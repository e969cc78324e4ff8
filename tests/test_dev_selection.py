"""Label-free checkpoint choice by DEV's one-standard-error rule (``OneStandardErrorRule``, ``val/dev_score``): the
latest epoch whose DEV risk is within one standard error of the lowest, through ``BestCheckpoint``, across a
resume, and the paper's plain lowest risk (``selection: dev_min``)."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fault_helpers import cli
from helpers import FAST
from tl_lightning.callbacks.results import BestCheckpoint
from tl_lightning.methods.dev_risk import OneStandardErrorRule

CONFIG = "configs/adaptation/digits_offline.yaml"


def _chosen(risks, errors) -> int:
    """The textbook rule over the whole fit: the latest epoch within one standard error of the lowest risk."""
    lowest = min(range(len(risks)), key=lambda i: (risks[i], i))
    return max(i for i, r in enumerate(risks) if r <= risks[lowest] + errors[lowest])


@pytest.mark.parametrize("risks, chosen", [
    ([0.40, 0.10, 0.12, 0.30, 0.105, 0.2], 4),  # epochs 1 and 4 are within 0.01 of the lowest: the later
    ([0.40, 0.10, 0.12, 0.30, 0.115, 0.2], 1),  # nothing after the lowest is within 0.01 of it
    ([0.40, 0.10, 0.105, 0.08, 0.30, 0.2], 3),  # a new lowest resets the band: epoch 2 was inside the old one
])
def test_the_rule_scores_so_that_the_lowest_score_of_the_latest_epoch_is_the_textbook_choice(risks, chosen):
    rule, errors = OneStandardErrorRule(), [0.01] * len(risks)
    scores = [rule.score(r, e) for r, e in zip(risks, errors)]
    latest_lowest = max(i for i, s in enumerate(scores) if s == min(scores))
    assert latest_lowest == chosen == _chosen(risks, errors)
    assert min(scores) == min(risks)


def test_the_rule_continues_from_its_state_as_if_never_stopped():
    risks = [0.3, 0.2, 0.21, 0.5, 0.195, 0.4]
    whole = OneStandardErrorRule()
    expected = [whole.score(r, 0.02) for r in risks]
    first = OneStandardErrorRule()
    scores = [first.score(r, 0.02) for r in risks[:3]]
    resumed = OneStandardErrorRule()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint would carry it
    assert scores + [resumed.score(r, 0.02) for r in risks[3:]] == expected


class _Scores(L.LightningModule):
    """Logs a fixed score per epoch; ``later_ties_win`` as the method says."""

    monitor = ("val/score", "min")
    SCORES = [3.0, 1.0, 2.0, 1.0, 5.0]

    def __init__(self, later_ties_win: bool):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.later_ties_win = later_ties_win

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("later_ties_win, best", [(True, "best-03.ckpt"), (False, "best-01.ckpt")])
def test_best_checkpoint_keeps_the_later_of_tied_epochs_only_when_the_method_asks(tmp_path, later_ties_win, best):
    data = DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=1)
    callback = BestCheckpoint()
    L.Trainer(max_epochs=5, default_root_dir=tmp_path, callbacks=[callback], logger=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              accelerator="cpu").fit(_Scores(later_ties_win), data, data)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == [best, "last.ckpt"]
    assert callback.best_model_score == 1.0


ARGS = ("--model.init_args.source_pretrain_epochs=0", "--data.init_args.epoch=2", "--data.init_args.num_workers=0",
        "--data.init_args.source.init_args.samples_per_class=20", "--data.init_args.labelled_per_class=0",
        "--model.init_args.soft_label_weight=0", "--trainer.limit_test_batches=1")


def _fit(run_dir, *overrides):
    """One fit in its own launched process (as the stopped run): every run of a comparison computes alike."""
    done = cli("fit", "--config", CONFIG, *FAST, *ARGS, f"--trainer.default_root_dir={run_dir}", *overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def _history(metrics: dict) -> tuple[list[float], list[float]]:
    rows = [r for r in metrics["history"] if "val/dev_risk" in r]
    return [r["val/dev_risk"] for r in rows], [r["val/dev_risk_se"] for r in rows]


def test_an_unsupervised_fit_chooses_by_the_rule_and_a_resumed_fit_chooses_the_same(tmp_path):
    """The run's best checkpoint is the rule's choice over its logged risks and standard errors, and a fit stopped
    by SIGTERM in epoch 3 of 5 and resumed chooses what the uninterrupted fit chose (the rule's state is in
    last.ckpt)."""
    whole = _fit(tmp_path / "whole", "--trainer.max_epochs=5")
    risks, errors = _history(whole)
    assert len(risks) == 5 and all(e > 0 for e in errors)
    assert whole["best_checkpoint"].endswith(f"best-{_chosen(risks, errors):02d}.ckpt")
    assert whole["best_score"] == pytest.approx(min(risks), rel=1e-6)
    last = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["dev_rule"]["lowest"] == pytest.approx(min(risks), rel=1e-6)

    run = tmp_path / "resumed"
    stopped = cli("fit", "--config", CONFIG, *FAST, *ARGS, f"--trainer.default_root_dir={run}",
                  "--trainer.max_epochs=5", "--trainer.callbacks+=tests.helpers.signal_at.SignalAt",
                  "--trainer.callbacks.epoch=3", "--trainer.callbacks.batch=1")  # SIGTERM: exit 143
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["dev_rule"]["lowest"] == pytest.approx(
        min(risks[:3]), rel=1e-6)
    resumed = _fit(run, "--trainer.max_epochs=5", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    resumed_risks, resumed_errors = _history(resumed)
    assert resumed_risks == pytest.approx(risks, rel=1e-5) and resumed_errors == pytest.approx(errors, rel=1e-5)
    assert resumed["best_checkpoint"].rsplit("/", 1)[1] == whole["best_checkpoint"].rsplit("/", 1)[1]


def test_dev_min_chooses_the_lowest_risk(tmp_path):
    metrics = _fit(tmp_path, "--trainer.max_epochs=4", "--model.init_args.selection=dev_min")
    risks, _ = _history(metrics)
    assert metrics["best_checkpoint"].endswith(f"best-{risks.index(min(risks)):02d}.ckpt")
