"""iCaRL: class-incremental learning with an exemplar memory (Rebuffi, Kolesnikov, Sperl & Lampert,
"iCaRL: Incremental Classifier and Representation Learning", CVPR 2017).

One ``fit`` runs every task of a :class:`~tl_lightning.data.incremental.ClassIncrementalDataModule`:
``epochs_per_task`` epochs each, scheduled by the ``callbacks.task_schedule.TaskSchedule`` callback that the
module adds (``configure_callbacks``); the DataModule's loaders are rebuilt every epoch and the task switches at
epoch boundaries. At the end of a task (Alg. 2) the memory is reduced to ``m`` exemplars per class (a prefix of
each herding order), exemplars of the new classes are chosen by herding, the exemplar class means are
recomputed, both classifiers (nearest-mean-of-exemplars and the network's outputs) are tested on every task
seen, and the network is frozen as the "previous model" of the next task, which starts with a fresh optimizer
state and scheduler (``start_task``).

Presets:

* ``paper``: sigmoid binary cross-entropy over the classes seen; old classes' targets are the previous model's
  sigmoid outputs, new classes are one-hot (Alg. 3); NME class means are averaged over flipped exemplars.
* ``transfer``: for a pretrained backbone; softmax cross-entropy plus knowledge distillation (Hinton et al.
  2015) of the previous model's old-class outputs; no flips.

``loss: ce`` (no distillation) with ``memory_budget: 0`` is plain fine-tuning, the lower bound.

This module keeps the network, the loss, the previous model and the steps; the pieces, one concern each:
``callbacks/task_schedule.py`` (tasks as epochs), ``incremental_task_end.py`` (herding, class means, evaluation,
their checkpoint state), ``exemplars.py`` (the memory), ``incremental_report.py`` and ``incremental_metrics.py``
(accuracy matrix, JSON, PNGs). The data side serves a frozen backbone's features (``serve_features``, which
the CLI fills in from ``ICaRL.served_features``).

DDP: the end-of-task work runs on global rank 0 and its result (memory, class means, accuracies) is broadcast,
so every rank holds the same memory. The previous model is a plain attribute: not a parameter, not in the DDP
wrapper. Checkpoints carry the memory, class means, class order, task index and previous model; a resumed run
continues in the task it was in (and finishes a task whose end it had reached but not processed).
"""
from __future__ import annotations

import copy
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tl_lightning.backbones import create_backbone, weights_id
from tl_lightning.callbacks.task_schedule import TaskSchedule
from tl_lightning.data.incremental import ClassIncrementalDataModule
from tl_lightning.errors import TLError
from tl_lightning.losses import distillation_loss, icarl_loss
from tl_lightning.methods.base import TransferModule
from tl_lightning.methods.exemplars import ExemplarMemory, nme_scores
from tl_lightning.methods.incremental_report import IncrementalReport
from tl_lightning.methods.incremental_task_end import TaskEnd

PRESETS = {"paper": {"loss": "bce", "flip_nme": True}, "transfer": {"loss": "kd", "flip_nme": False}}


class IncrementalNet(nn.Module):
    """Backbone (timm, pooled features) -> optional neck -> one linear output per class of the whole sequence.

    2-D inputs are taken as precomputed backbone features (served by the data side for a frozen backbone)."""

    def __init__(self, backbone: str, weights: str, num_classes: int, neck_dim: int = 0):
        super().__init__()
        self.backbone = create_backbone(backbone, weights, num_classes=0)
        dim = self.backbone.num_features
        self.neck = nn.Sequential(nn.Linear(dim, neck_dim), nn.ReLU(inplace=True)) if neck_dim else nn.Identity()
        self.head = nn.Linear(neck_dim or dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation ``φ(x)`` that herding and the NME classifier read."""
        return self.neck(self.backbone(x) if x.ndim == 4 else x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class ICaRL(TaskEnd, IncrementalReport, TransferModule):
    """iCaRL over the tasks of a ``ClassIncrementalDataModule`` (see module docstring)."""

    def __init__(
        self,
        backbone: str = "digit_cnn",
        weights: str = "none",
        freeze_backbone: bool = False,
        neck_dim: int = 0,
        epochs_per_task: int = 2,
        memory_budget: Optional[int] = 2000,
        memory_per_class: Optional[int] = None,
        preset: Literal["paper", "transfer"] = "paper",
        loss: Optional[Literal["bce", "kd", "ce"]] = None,
        flip_nme: Optional[bool] = None,
        kd_temperature: float = 2.0,
        kd_weight: float = 1.0,
        **kwargs,
    ):
        """
        Args:
            backbone: timm model name (``digit_cnn`` for digits from scratch, ``tf_efficientnet_lite0`` pretrained).
            weights: ``none``, ``bundled``, ``hub`` or a checkpoint path.
            freeze_backbone: keep the backbone fixed (eval mode); only the neck and the output layer learn.
            neck_dim: width of a trainable ReLU layer between backbone and outputs (0: none).
            epochs_per_task: training epochs of every task; the fit stops after the last task (a smaller
                ``max_epochs`` stops mid-sequence).
            memory_budget: total exemplars K, ``floor(K / classes seen)`` per class; 0 keeps no memory.
            memory_per_class: a fixed number of exemplars per class instead of the total budget.
            preset: ``paper`` (sigmoid BCE + distillation targets, flipped NME means) or ``transfer``
                (softmax CE + knowledge distillation, no flips).
            loss: override the preset's loss: ``bce`` (iCaRL), ``kd`` (CE + KD) or ``ce`` (no distillation).
            flip_nme: override the preset: average NME class means over horizontally flipped exemplars.
            kd_temperature: distillation temperature of the ``kd`` loss.
            kd_weight: weight of the distillation term of the ``kd`` loss.
        """
        super().__init__(**kwargs)
        if self.multilabel:
            raise TLError("ICaRL needs single-label classification data; the DataModule is multi-label.")
        if epochs_per_task < 1:
            raise TLError("epochs_per_task must be >= 1; fix --model.epochs_per_task.")
        self.backbone_name = backbone
        self.weights = weights
        self.freeze_backbone = freeze_backbone
        self.epochs_per_task = epochs_per_task
        self.loss_name = loss or PRESETS[preset]["loss"]
        self.flip_nme = PRESETS[preset]["flip_nme"] if flip_nme is None else flip_nme
        self.kd_temperature = kd_temperature
        self.kd_weight = kd_weight
        self.net = IncrementalNet(backbone, weights, self.num_classes, neck_dim)
        if freeze_backbone:
            self.net.backbone.requires_grad_(False)
            self.net.backbone.eval()
        self.memory = ExemplarMemory(memory_budget, memory_per_class)
        self.means: Optional[torch.Tensor] = None  # (num_classes, D) exemplar means, rows of classes in memory
        self.finished = 0  # tasks whose end (memory update + evaluation) is done
        self.rows: dict[str, list] = {"nme": [], "cnn": []}  # accuracy matrix rows
        self.seen_acc: dict[str, list] = {"nme": [], "cnn": []}
        self.classes_seen: list[int] = []
        self.class_order: list[str] = []
        self._previous: list[nn.Module] = []  # frozen previous model, in a list: not a submodule
        self._optimizer_task = 0  # the task the optimizer state belongs to
        self._fresh_scheduler_states: list[dict] = []  # the schedulers as created, reloaded at a task's start

    # ----- the task structure (from the DataModule) -----------------------------------------------------------
    @property
    def dm(self) -> ClassIncrementalDataModule:
        return self.required_datamodule(
            ClassIncrementalDataModule, "use data.class_path tl_lightning.data.incremental.ClassIncrementalDataModule "
            "(a class-incremental DataModule) around your data set.")

    @property
    def task(self) -> int:
        """The task being trained (the last one once every task is finished)."""
        return min(self.finished, self.dm.num_tasks - 1)

    @property
    def monitor(self) -> tuple[Optional[str], str]:
        return None, "max"  # accuracy falls as classes arrive: the checkpoint to keep is the latest

    @property
    def previous_model(self) -> Optional[nn.Module]:
        return self._previous[0] if self._previous else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_backbone:
            self.net.backbone.eval()
        return self

    backbone = property(lambda self: self.net.backbone, doc="The model contract's name for ``net.backbone``.")
    head = property(lambda self: self.net.head, doc="The model contract's name for ``net.head``.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _seen_logits(self, logits: torch.Tensor, seen: int) -> torch.Tensor:
        """All outputs with those of classes not seen yet pushed to the minimum (for argmax metrics)."""
        masked = logits.clone()
        masked[:, seen:] = torch.finfo(masked.dtype).min
        return masked

    # ----- Lightning hooks; the task sequence is the TaskSchedule callback's --------------------------------
    def configure_callbacks(self):
        return [TaskSchedule()]

    @staticmethod
    def served_features(weights: str = "bundled", freeze_backbone: bool = False, preset: str = "paper",
                        flip_nme: Optional[bool] = None, **_) -> Optional[dict]:
        """The DataModule's ``serve_features`` for these arguments (the CLI links it): a frozen backbone's
        weights; None (images) when it trains, flips images or is random."""
        flips = PRESETS.get(preset, {}).get("flip_nme", False) if flip_nme is None else flip_nme
        return {"weights": weights} if freeze_backbone and not flips and weights != "none" else None

    def setup(self, stage: str) -> None:
        self.class_order = self.dm.class_names
        if self.dm.feature_weights is not None and (not self.freeze_backbone or self.flip_nme):
            raise TLError("the DataModule serves backbone features, which needs --model.freeze_backbone=true and "
                          "--model.flip_nme=false; build serve_features with ICaRL.served_features (the CLI does).")

    def _check_served_features(self) -> None:
        if self.dm.feature_weights_id is not None and weights_id(self.net.backbone) != self.dm.feature_weights_id:
            raise TLError("the DataModule serves backbone features read with other weights than the model's "
                          "backbone; build serve_features with ICaRL.served_features (the CLI does this).")

    def on_fit_start(self) -> None:
        self._check_served_features()
        if self.previous_model is not None:
            self.previous_model.to(self.device)

    on_test_start = _check_served_features

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.rows["cnn"]:
            self.write_report(self.trainer.default_root_dir)

    def memory_positions(self):
        """The exemplars' positions in the full training split (what the DataModule replays)."""
        return self.memory.positions()

    def configure_optimizers(self):
        config = super().configure_optimizers()
        schedulers = [config["lr_scheduler"]["scheduler"]] if isinstance(config, dict) else []
        self._fresh_scheduler_states = [copy.deepcopy(s.state_dict()) for s in schedulers]
        return config

    def start_task(self, task: int) -> None:
        """A task's first epoch: the optimizer state and the schedulers start afresh (once per task, resume too)."""
        if task <= self._optimizer_task:
            return
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
            for group in optimizer.param_groups:
                if "initial_lr" in group:
                    group["lr"] = group["initial_lr"]
        for config, state in zip(self.trainer.lr_scheduler_configs, self._fresh_scheduler_states):
            config.scheduler.load_state_dict(copy.deepcopy(state))
        self._optimizer_task = task

    # ----- end of a task: memory, class means, evaluation, previous model ------------------------------------
    def finish_task(self, task: int) -> None:
        """Alg. 2 at the end of ``task`` (on rank 0, broadcast): memory, class means, accuracies, previous model."""
        dm = self.dm
        result = self._task_end_on_rank_zero(task) if self.trainer.is_global_zero else None
        if self.trainer.world_size > 1:
            result = self.trainer.strategy.broadcast(result, src=0)
        self.memory.load_state_dict(result["memory"])
        self.means = result["means"].to(self.device) if result["means"] is not None else None
        for clf in ("nme", "cnn"):
            self.rows[clf].append(result["rows"][clf])
            self.seen_acc[clf].append(result["seen"][clf])
        self.classes_seen.append(dm.seen_classes(task))
        self.finished = task + 1
        previous = copy.deepcopy(self.net).eval()
        previous.requires_grad_(False)
        self._previous = [previous]
        self._log_task(task, result)

    # ----- steps -----------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        dm = self.dm
        seen, old = dm.seen_classes(self.task), dm.task_classes(self.task).start
        logits = self.net(x)
        loss = self.representation_loss(logits[:, :seen], y, x, old)
        self.log_epoch_mean("train/loss", loss, len(y), prog_bar=True)
        self.log_metrics("train", self._seen_logits(logits.detach(), seen), y)
        return loss

    def representation_loss(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, num_old: int) -> torch.Tensor:
        """The loss of the seen classes' outputs ``logits``; old classes are distilled from the previous model."""
        previous = self.previous_model if num_old > 0 and self.loss_name != "ce" else None
        old_logits = None
        if previous is not None:
            with torch.no_grad():
                old_logits = previous(x)[:, :num_old]
        if self.loss_name == "bce":
            return icarl_loss(logits, y, old_logits, num_old)
        loss = F.cross_entropy(logits, y)
        if old_logits is not None:
            loss = loss + self.kd_weight * distillation_loss(logits[:, :num_old], old_logits, self.kd_temperature)
        return loss

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        seen = self.dm.seen_classes(self.task)
        feats = self.net.embed(x)
        logits = self.net.head(feats)
        self.log_epoch_mean(f"{stage}/loss", F.cross_entropy(logits[:, :seen], y), len(y))
        self.log_metrics(stage, self._seen_logits(logits, seen), y)
        if stage == "test" and self.means is not None:
            nme = (nme_scores(feats, self.means[:seen]).argmax(1) == y).float().mean()
            self.log_epoch_mean("test/nme_acc", nme, len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        seen = self.dm.seen_classes(self.task)
        probs = self.net(x)[:, :seen].softmax(-1)
        score, pred = probs.max(-1)
        return {"pred": pred, "score": score, "probs": probs}
