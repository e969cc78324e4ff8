"""The source stage of ``DomainAdaptation``: the source model its soft labels come from.

Tzeng et al. (2015, sec. 3.3) compute soft labels once, before adaptation, from a model trained on the source:
per class, the mean softmax at temperature τ of that model over the source examples of the class. The source
model is either a checkpoint of a ``source_only`` run (``load_source_model``) or trained in the first
``source_pretrain_epochs`` epochs of the same fit: the stage is a function of the epoch (``in_source_stage``),
so Lightning's loop runs it like any epoch (signals, checkpoints, resume, DDP).

``SourceStage`` is a mixin of the LightningModule: it owns the stage's hooks and state (``teacher``,
``source_stage_done``, ``pretrain_history``) and reads the module's ``features``, ``classifier``, ``mode``,
``soft_label_weight``, ``source_checkpoint``, ``init_from_source`` and ``source_pretrain_epochs``.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tl_lightning.data.domains import DomainPairDataModule
from tl_lightning.errors import TLError
from tl_lightning.losses import class_soft_labels
from tl_lightning.methods.domain_statistics import SOURCE, TARGET_PREFIX, seed_target_statistics


def source_model(features: nn.Module, classifier: nn.Module) -> nn.Sequential:
    """A copy of ``classifier(features(x))`` as one module (under per-domain BatchNorm it normalises with the
    source statistics: the target's are read only inside ``target_statistics``)."""
    return nn.Sequential(copy.deepcopy(features), copy.deepcopy(classifier))


def load_source_model(path: str, features: nn.Module, classifier: nn.Module) -> nn.Sequential:
    """The source model (``features.*`` and ``classifier.*`` weights) of a DomainAdaptation checkpoint, in a copy
    of ``features`` and ``classifier``."""
    try:  # tensors and plain containers only: a checkpoint can not run code while it loads
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TLError(f"cannot read source_checkpoint '{path}' ({e.__class__.__name__}); pass a checkpoint "
                      "written by a tl_lightning source_only run (loaded with weights_only=True).") from e
    state = state.get("state_dict", state)
    model = source_model(features, classifier)
    wanted = {f"{i}.{k}": f"{prefix}.{k}" for i, (prefix, part) in
              enumerate((("features", features), ("classifier", classifier))) for k in part.state_dict()}
    for dst, src in list(wanted.items()):  # a source model without target statistics: the source's stand in
        if src not in state and TARGET_PREFIX in src:
            wanted[dst] = src.replace(TARGET_PREFIX, "")
    missing = [src for src in wanted.values() if src not in state]
    if missing:
        raise TLError(f"checkpoint '{path}' does not hold this model's weights ({missing[0]} is missing); "
                      "use a checkpoint of a DomainAdaptation source_only run with the same backbone.")
    try:
        model.load_state_dict({dst: state[src] for dst, src in wanted.items()})
    except RuntimeError as e:
        raise TLError(f"checkpoint '{path}' has other shapes than this model (another backbone or class "
                      "count?); use a source_only run of the same configuration.") from e
    return model


@torch.no_grad()
def source_soft_labels(read: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, num_classes: int,
                       temperature: float, device: torch.device) -> torch.Tensor:
    """Per-class mean softmax at ``temperature`` of ``read`` (a source model's logits, in eval mode) over the
    source ``(x, y)`` batches."""
    logits, targets = [], []
    for x, y in batches:
        logits.append(read(x.to(device)).float().cpu())
        targets.append(y)
    return class_soft_labels(torch.cat(logits), torch.cat(targets), num_classes, temperature)


class SourceStage:
    """The source stage's hooks and state (a mixin of ``DomainAdaptation``, see the module docstring)."""

    def _pair(self) -> DomainPairDataModule:
        return self.required_datamodule(
            DomainPairDataModule, "use data.class_path: tl_lightning.data.domains.DomainPairDataModule (a "
            "source/target pair).")

    @property
    def uses_soft_labels(self) -> bool:
        return self.mode == "adapt" and self.soft_label_weight > 0

    def on_fit_start(self) -> None:
        dm = self._pair()
        if self.mode == "target_only" and not dm.has_labelled_target:
            raise TLError("mode target_only needs labelled target samples; set data labelled_per_class > 0 "
                          "or null (all).")
        if self.uses_soft_labels:
            if not dm.has_labelled_target:
                raise TLError("soft labels apply to labelled target samples; set data labelled_per_class > 0 "
                              "or soft_label_weight: 0.")
            if not self.source_checkpoint and self.source_pretrain_epochs < 1:
                raise TLError("soft labels need a source-trained model: set source_checkpoint (a source_only "
                              "checkpoint) or source_pretrain_epochs >= 1.")
        max_epochs = self.trainer.max_epochs
        if self.source_stage_epochs and max_epochs is not None and 0 <= max_epochs <= self.source_stage_epochs:
            raise TLError(f"max_epochs ({max_epochs}) counts the {self.source_stage_epochs} source_pretrain_epochs "
                          "too, so no epoch would adapt; set trainer.max_epochs > source_pretrain_epochs.")

    @property
    def source_stage_epochs(self) -> int:
        """Epochs of the source stage at the start of the fit: the network (warm start, ``init_from_source``) or
        its ``teacher`` copy trained on the source alone; 0 with a ``source_checkpoint`` or nothing to teach."""
        if self.source_checkpoint or self.mode == "target_only":
            return 0
        if not self.init_from_source and self.teacher is None:
            return 0
        return self.source_pretrain_epochs

    @property
    def in_source_stage(self) -> bool:
        return self.current_epoch < self.source_stage_epochs  # a function of the epoch: no device sync per step

    @property
    def selectable(self) -> bool:
        """Whether this epoch's model may be chosen as the best checkpoint: not in the source stage, whose model
        is not adapted (``BestCheckpoint``)."""
        return not self.in_source_stage

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._stage_loss = torch.zeros((), device=self.device), 0
        if not bool(self.source_stage_done) and self.current_epoch >= self.source_stage_epochs:
            self._finish_source_stage()

    def _finish_source_stage(self) -> None:
        """After the source stage (or at the start without one): the teacher's soft labels, the warm start from a
        ``source_checkpoint``, and target BatchNorm statistics seeded from the trained source statistics."""
        if self.source_checkpoint:
            teacher = load_source_model(self.source_checkpoint, self.features, self.classifier).to(self.device)
            if self.init_from_source:
                self.features.load_state_dict(teacher[0].state_dict())
                self.classifier.load_state_dict(teacher[1].state_dict())
        else:
            teacher = self.teacher if self.teacher is not None else self
        if self.domain_batchnorm:
            seed_target_statistics(self.features)
        if self.uses_soft_labels:
            read = (lambda x: self(x, SOURCE)) if teacher is self else teacher
            was_training = teacher.training
            teacher.eval()
            soft = source_soft_labels(read, self._pair().source_loader(), self.num_classes,
                                      self.temperature, self.device)
            teacher.train(was_training)
            # every rank read the whole source; its BatchNorm statistics are its own: one mean for all ranks
            soft = self.trainer.strategy.reduce(soft.to(self.soft_labels), reduce_op="mean")
            self.soft_labels.copy_(soft)
        self.source_stage_done.fill_(True)
        if self.source_stage_epochs:
            rank_zero_info(f"source stage done after {self.source_stage_epochs} epochs: adaptation starts at epoch "
                           f"{self.current_epoch}")

    def _source_step(self, batch: dict) -> None:
        """A step of the source stage: L_C on the source batch, for the network or its teacher copy."""
        model_opt, _domain_opt, *teacher_opt = self.optimizers()
        x, y = batch["source"]
        logits = self.teacher(x) if self.teacher is not None else self(x, SOURCE)
        loss = self._supervised_step(teacher_opt[0] if teacher_opt else model_opt, logits, y, "source_acc")
        total, count = self._stage_loss
        self._stage_loss = total + loss.detach() * len(y), count + len(y)

    def on_fit_end(self) -> None:
        if not bool(self.source_stage_done) and self.source_stage_epochs:
            rank_zero_warn(f"training stopped in the source stage (epoch {self.current_epoch} of "
                           f"{self.source_stage_epochs}): the network was not adapted; raise max_epochs/max_steps.")

    def configure_model(self) -> None:
        super().configure_model()
        if self.teacher is not None and self._channels_last:
            self.teacher.to(memory_format=torch.channels_last)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["source_pretrain_loss"] = list(self.pretrain_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.pretrain_history = list(checkpoint.get("source_pretrain_loss", []))

    def _end_source_epoch(self) -> None:
        total, count = self._stage_loss
        self.pretrain_history.append(float(total) / max(count, 1))
