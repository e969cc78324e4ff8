"""Epoch-level logging at one ``self.log`` call per metric and loop run, not one per step.

Lightning's ``self.log`` costs about 1 to 2.5 ms a call on a CPU (it walks its result collection each time), which
is more than a whole training step of a linear head on cached features. Every value the methods log is an epoch
mean (``on_step=False``), so the values accumulate in torchmetrics objects, updated every step, and each object is
handed to ``self.log`` once per loop run (a training epoch, a validation or a test run): Lightning computes it at
the run's end (synced over DDP processes by torchmetrics) and resets it, as it does for any logged metric object.

A loss is a ``BatchWeightedMean``: the mean of batch means weighted by batch size, i.e. the exact mean over the
epoch's items, as Lightning's own ``on_epoch`` mean is. A NaN is kept, never dropped. (torchmetrics' ``MeanMetric``
either drops NaNs or, with ``nan_strategy="disable"``, ignores the weights.) Its update makes no host sync.
Checkpoints are written at epoch ends only, so no partial accumulation needs saving.

Subclasses that override ``on_train_epoch_start``, ``on_validation_epoch_start`` or ``on_test_epoch_start`` call
``super()`` first.
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection


class BatchWeightedMean(Metric):
    """Mean of values weighted by their counts, summed over DDP processes at ``compute``; NaN propagates."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.total += value.detach().to(self.total.dtype) * weight
        self.count += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class EpochLogging:
    """Mixin of ``TransferModule`` (a LightningModule)."""

    def _logged_in_run(self) -> dict:
        if "_logged_names" not in self.__dict__:
            self.__dict__["_logged_names"] = {}  # stage -> names handed to self.log in the current loop run
        return self.__dict__["_logged_names"]

    def first_in_run(self, name: str) -> bool:
        """True the first time ``name`` (``<stage>/...``) is asked about in the current loop run of its stage."""
        stage = name.split("/", 1)[0]
        seen = self._logged_in_run().setdefault(stage, set())
        if name in seen:
            return False
        seen.add(name)
        return True

    def _new_run(self, stage: str) -> None:
        self._logged_in_run().pop(stage, None)

    def on_train_epoch_start(self) -> None:
        self._new_run("train")

    def on_validation_epoch_start(self) -> None:
        self._new_run("val")

    def on_test_epoch_start(self) -> None:
        self._new_run("test")

    def _epoch_means(self) -> nn.ModuleDict:
        if "epoch_means" not in self._modules:
            self.epoch_means = nn.ModuleDict()  # no parameters, no persistent state: the state dict is unchanged
        return self.epoch_means

    def log_epoch_mean(self, name: str, value: torch.Tensor | float, batch_size: int, prog_bar: bool = False,
                       add_dataloader_idx: bool = True) -> None:
        """Add the batch mean ``value`` over ``batch_size`` items to the epoch mean logged as ``name``."""
        means = self._epoch_means()
        key = name.replace("/", "__").replace(".", "_")
        if key not in means:
            means[key] = BatchWeightedMean().to(self.device)
        mean = means[key]
        mean.update(value if isinstance(value, torch.Tensor) else torch.tensor(float(value)), batch_size)
        if self.first_in_run(name):
            self.log(name, mean, on_step=False, on_epoch=True, prog_bar=prog_bar, metric_attribute=f"epoch_means.{key}",
                     add_dataloader_idx=add_dataloader_idx)

    def log_metric_objects(self, name: str, metrics: MetricCollection | Metric, **log_kwargs) -> None:
        """Hand ``metrics`` (updated by the caller every step) to ``self.log_dict`` once per loop run; ``name``
        (``<stage>/...``) identifies them in the run."""
        if self.first_in_run(name):
            self.log_dict(metrics, on_step=False, on_epoch=True, **log_kwargs)
