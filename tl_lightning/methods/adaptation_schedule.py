"""The schedules of ``DomainAdaptation`` (Ganin & Lempitsky, ICML 2015, sec. 5.2), functions of the training
progress p in [0, 1] of the adaptation steps (the source stage's epochs are not counted):

* λ_p = 2/(1+exp(-10p)) - 1 scales the confusion weight λ (``lambda_schedule``);
* μ_p = μ_0/(1+10p)^0.75 anneals the learning rates of the network and the domain classifier per step
  (``lr_annealing``, when no ``scheduler`` is configured).

``AdaptationSchedule`` is a mixin of the LightningModule; it reads the module's ``confusion_weight``,
``lambda_schedule``, ``lr_annealing``, ``source_stage_epochs`` and the configured ``scheduler_factory``.
"""
from __future__ import annotations

import functools

from torch.optim.lr_scheduler import LambdaLR

from tl_lightning.losses import dann_lambda


class AdaptationSchedule:
    """λ_p and μ_p from the adaptation's progress (see the module docstring)."""

    def progress(self, done: int) -> float:
        """p: the finished share of the training batches after ``done`` of them (1 when unbounded)."""
        total = self.trainer.estimated_stepping_batches
        if not total or total == float("inf"):
            return 1.0
        total -= self.source_stage_epochs * self.trainer.num_training_batches  # adaptation steps only
        return min(done / total, 1.0) if total > 0 else 1.0

    def adaptation_weight(self) -> float:
        """λ, times λ_p when scheduled."""
        if not self.lambda_schedule:
            return self.confusion_weight
        done = (self.current_epoch - self.source_stage_epochs) * self.trainer.num_training_batches + self._batch_idx
        return self.confusion_weight * dann_lambda(self.progress(done))

    def learning_rate_schedulers(self, optimizers: list) -> list:
        """One scheduler per optimizer: the configured ``scheduler``, else μ_p with ``lr_annealing``, else none."""
        if self.scheduler_factory is not None:
            factory = self.scheduler_factory
        elif self.lr_annealing:
            factory = functools.partial(LambdaLR, lr_lambda=lambda step: (1 + 10 * self.progress(step)) ** -0.75)
        else:
            return []
        return [factory(optimizer) for optimizer in optimizers]

    def _step_schedulers(self, interval: str) -> None:
        schedulers = self.lr_schedulers()
        annealing = self.lr_annealing and self.scheduler_factory is None  # per step by definition
        if not schedulers or interval != ("step" if annealing else self.scheduler_interval):
            return
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()
