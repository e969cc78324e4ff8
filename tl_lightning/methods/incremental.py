"""iCaRL: class-incremental learning with an exemplar memory (Rebuffi, Kolesnikov, Sperl & Lampert,
"iCaRL: Incremental Classifier and Representation Learning", CVPR 2017).

One ``fit`` runs every task of a :class:`~tl_lightning.data.incremental.ClassIncrementalDataModule`:
``epochs_per_task`` epochs each; the DataModule's loaders are rebuilt every epoch and the task switches at
epoch boundaries. At the end of a task (Alg. 2) the memory is reduced to ``m`` exemplars per class (a prefix of
each herding order), exemplars of the new classes are chosen by herding, the exemplar class means are
recomputed, both classifiers (nearest-mean-of-exemplars and the network's outputs) are tested on every task
seen, and the network is frozen as the "previous model" of the next task, which gets a fresh optimizer and
scheduler.

Presets:

* ``paper``: sigmoid binary cross-entropy over the classes seen; old classes' targets are the previous model's
  sigmoid outputs, new classes are one-hot (Alg. 3); NME class means are averaged over flipped exemplars.
* ``transfer``: for a pretrained backbone; softmax cross-entropy plus knowledge distillation (Hinton et al.
  2015) of the previous model's old-class outputs; no flips.

``loss: ce`` (no distillation) with ``memory_budget: 0`` is plain fine-tuning, the lower bound.

DDP: the end-of-task work runs on global rank 0 and its result (memory, class means, accuracies) is broadcast,
so every rank holds the same memory. The previous model is a plain attribute: not a parameter, not in the DDP
wrapper. Checkpoints carry the memory, class means, class order, task index and previous model; a resumed run
continues in the task it was in (and finishes a task whose end it had reached but not processed).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.atomic import write_text
from tl_lightning.backbones import create_backbone, weights_id
from tl_lightning.data.base import default_cache_dir
from tl_lightning.data.incremental import ClassIncrementalDataModule
from tl_lightning.errors import TLError
from tl_lightning.feature_cache import FeatureCache, cache_key, extract_features
from tl_lightning.losses import distillation_loss, icarl_loss
from tl_lightning.methods.base import TransferModule
from tl_lightning.methods.exemplars import ExemplarMemory, class_means, herding_order, nme_scores
from tl_lightning.methods.incremental_metrics import (
    flat_metrics, plot_accuracy_curve, plot_accuracy_matrices, summarize,
)

PRESETS = {"paper": {"loss": "bce", "flip_nme": True}, "transfer": {"loss": "kd", "flip_nme": False}}
STATE_KEY = "icarl"


class IncrementalNet(nn.Module):
    """Backbone (timm, pooled features) -> optional neck -> one linear output per class of the whole sequence.

    2-D inputs are taken as precomputed backbone features (the feature cache of a frozen backbone)."""

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


class ICaRL(TransferModule):
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
        cache_features: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        """
        Args:
            backbone: timm model name (``digit_cnn`` for digits from scratch, ``tf_efficientnet_lite0`` pretrained).
            weights: ``none``, ``bundled``, ``hub`` or a checkpoint path.
            freeze_backbone: keep the backbone fixed (eval mode); only the neck and the output layer learn.
            neck_dim: width of a trainable ReLU layer between backbone and outputs (0: none).
            epochs_per_task: training epochs of every task (``max_epochs`` becomes tasks x this).
            memory_budget: total exemplars K, ``floor(K / classes seen)`` per class; 0 keeps no memory.
            memory_per_class: a fixed number of exemplars per class instead of the total budget.
            preset: ``paper`` (sigmoid BCE + distillation targets, flipped NME means) or ``transfer``
                (softmax CE + knowledge distillation, no flips).
            loss: override the preset's loss: ``bce`` (iCaRL), ``kd`` (CE + KD) or ``ce`` (no distillation).
            flip_nme: override the preset: average NME class means over horizontally flipped exemplars.
            kd_temperature: distillation temperature of the ``kd`` loss.
            kd_weight: weight of the distillation term of the ``kd`` loss.
            cache_features: with a frozen backbone (and no flips), extract backbone features once and reuse them.
            cache_dir: feature cache folder; default ``$TL_LIGHTNING_CACHE`` or ``~/.cache/tl_lightning``.
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
        self.feature_cache = FeatureCache(cache_dir or default_cache_dir(),
                                          enabled=cache_features and freeze_backbone and not self.flip_nme)
        self.memory = ExemplarMemory(memory_budget, memory_per_class)
        self.means: Optional[torch.Tensor] = None  # (num_classes, D) exemplar means, rows of classes in memory
        self.finished = 0  # tasks whose end (memory update + evaluation) is done
        self.rows: dict[str, list] = {"nme": [], "cnn": []}  # accuracy matrix rows
        self.seen_acc: dict[str, list] = {"nme": [], "cnn": []}
        self.classes_seen: list[int] = []
        self.class_order: list[str] = []
        self._previous: list[nn.Module] = []  # frozen previous model, in a list: not a submodule
        self._resume_epoch = 0
        self._fresh_optimizer = False

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

    # ----- Lightning hooks: the task sequence ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.dm
        self.class_order = dm.class_names
        if self.feature_cache.enabled:
            dm.loader_hook = self._feature_loader
        if stage == "fit":
            total = dm.num_tasks * self.epochs_per_task
            loop = self.trainer.fit_loop
            if loop.max_epochs is None or loop.max_epochs < 0 or loop.max_epochs > total:
                loop.max_epochs = total
            self.trainer.reload_dataloaders_every_n_epochs = 1

    def on_fit_start(self) -> None:
        if self.previous_model is not None:
            self.previous_model.to(self.device)
        self._catch_up(self._resume_epoch // self.epochs_per_task)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        expected = self.current_epoch // self.epochs_per_task
        if expected != self.task:  # e.g. max_epochs cut a task short and training continues
            self._catch_up(expected)
        if self._fresh_optimizer:
            self.trainer.strategy.setup_optimizers(self.trainer)
            self._fresh_optimizer = False

    def on_train_epoch_end(self) -> None:
        if (self.current_epoch + 1) % self.epochs_per_task == 0:
            self._catch_up((self.current_epoch + 1) // self.epochs_per_task)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and self.rows["cnn"]:
            self.write_report(self.trainer.default_root_dir)

    def _catch_up(self, target: int) -> None:
        """Finish every task before ``target`` that is not finished yet, then serve the current task."""
        while self.finished < min(target, self.dm.num_tasks):
            self._finish_task(self.finished)
        self._serve_task()

    def _serve_task(self) -> None:
        self.dm.set_task(self.task, self.memory.positions())

    # ----- end of a task: memory, class means, evaluation, previous model ------------------------------------
    def _finish_task(self, task: int) -> None:
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
        self._fresh_optimizer = self.finished < dm.num_tasks
        self._log_task(task, result)

    @torch.no_grad()
    def _task_end_on_rank_zero(self, task: int) -> dict:
        dm = self.dm
        seen = dm.seen_classes(task)
        was_training = self.training
        self.eval()
        try:
            self._update_memory(task)
            means = self._exemplar_means(seen)
            rows, seen_acc = self._evaluate(task, means)
        finally:
            self.train(was_training)
        return {"memory": self.memory.state_dict(), "means": None if means is None else means.cpu(),
                "rows": rows, "seen": seen_acc}

    def _update_memory(self, task: int) -> None:
        """Reduce the old classes' sets (prefix cut), then herd exemplars of the new classes (Alg. 4, 5)."""
        dm = self.dm
        sizes = self.memory.sizes(list(range(dm.seen_classes(task))))
        self.memory.reduce(sizes)
        train = dm.full_split("train", deterministic=True)
        targets = train.targets
        for c in dm.task_classes(task):
            positions = np.flatnonzero(targets == c)
            if sizes[c] == 0 or not len(positions):
                self.memory.add(c, positions[:0])
                continue
            feats, _ = self._embed_all("train", train.subset(positions))
            self.memory.add(c, positions[herding_order(feats, sizes[c]).numpy()])

    def _exemplar_means(self, seen: int) -> Optional[torch.Tensor]:
        """NME class means over each class's exemplars (None while a seen class has no exemplar)."""
        if any(len(self.memory.exemplars.get(c, ())) == 0 for c in range(seen)):
            return None
        exemplars = self.dm.full_split("train", deterministic=True).subset(self.memory.positions(list(range(seen))))
        feats, labels = self._embed_all("train", exemplars)
        flipped = self._embed_all("train", exemplars, flip=True)[0] if self.flip_nme else None
        return class_means(feats, labels, self.num_classes, flipped)

    def _evaluate(self, task: int, means: Optional[torch.Tensor]) -> tuple[dict, dict]:
        """Accuracy per task seen (a row of R) and on all seen classes, for NME and the network's outputs."""
        dm = self.dm
        seen = dm.seen_classes(task)
        test = dm.task_split("test", task, deterministic=True)
        feats, labels, logits = self._embed_all("test", test, with_logits=True)
        preds = {"cnn": logits[:, :seen].argmax(1)}
        if means is not None:
            preds["nme"] = nme_scores(feats, means[:seen]).argmax(1)
        task_of = torch.as_tensor(dm.task_of_label())[labels]
        rows, seen_acc = {}, {}
        for clf in ("nme", "cnn"):
            if clf not in preds:
                rows[clf], seen_acc[clf] = [None] * (task + 1), None
                continue
            correct = (preds[clf] == labels).float()
            rows[clf] = [float(correct[task_of == j].mean()) for j in range(task + 1)]
            seen_acc[clf] = float(correct.mean())
        return rows, seen_acc

    def _embed_all(self, split: str, dataset, flip: bool = False, with_logits: bool = False):
        """``φ(x)`` (and outputs) of every sample of ``dataset`` in eval mode, on this device."""
        loader = self._eval_loader(split, dataset)
        feats, labels, logits = [], [], []
        for x, y in loader:
            x = x.to(self.device)
            if flip:
                x = torch.flip(x, dims=[3])
            f = self.net.embed(x)
            feats.append(f.float().cpu())
            labels.append(y)
            if with_logits:
                logits.append(self.net.head(f).float().cpu())
        feats, labels = torch.cat(feats), torch.cat(labels)
        return (feats, labels, torch.cat(logits)) if with_logits else (feats, labels)

    def _log_task(self, task: int, result: dict) -> None:
        metrics = {"incremental/task": float(task), "incremental/classes_seen": float(self.classes_seen[-1])}
        for clf in ("nme", "cnn"):
            if result["seen"][clf] is not None:
                metrics[f"incremental/{clf}/seen_accuracy"] = result["seen"][clf]
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        nme = result["seen"]["nme"]
        rank_zero_info(f"[iCaRL] task {task + 1}/{self.dm.num_tasks}: {self.classes_seen[-1]} classes seen, "
                       f"exemplars {len(self.memory)}, accuracy CNN {100 * result['seen']['cnn']:.1f}%"
                       + (f", NME {100 * nme:.1f}%" if nme is not None else ""))

    # ----- feature cache (frozen backbone) ---------------------------------------------------------------------
    def _cached_split(self, split: str) -> tuple[torch.Tensor, np.ndarray]:
        """Backbone features of the wrapped data set's whole deterministic ``split`` (independent of the class
        order, so every order reuses them) and the source indices of their rows."""
        base = self.dm.dataset.split_dataset(split, deterministic=True)
        key = cache_key(method="icarl", backbone=self.backbone_name, weights=weights_id(self.net.backbone),
                        dataset=base.fingerprint())

        def compute() -> dict:
            loader = self.dm.make_loader(base, shuffle=False)
            return extract_features(self.net.backbone, loader, self.device, desc=f"extracting {split} features")

        if self.trainer.world_size > 1:
            if self.trainer.is_global_zero:
                self.feature_cache.get_or_compute(key, compute)
            self.trainer.strategy.barrier("icarl_feature_cache")
        return self.feature_cache.get_or_compute(key, compute)["features"], base.indices

    def _cached_subset(self, split: str, dataset) -> TensorDataset:
        """``dataset`` (a view of the same source) as cached features and its class-order labels."""
        feats, indices = self._cached_split(split)
        order = np.argsort(indices)
        rows = torch.as_tensor(order[np.searchsorted(indices[order], dataset.indices)])
        return TensorDataset(feats[rows], torch.as_tensor(dataset.targets, dtype=torch.long))

    def _feature_loader(self, split: str, dataset, shuffle: bool) -> Optional[DataLoader]:
        if split == "predict" or (split == "train" and not self.dm.deterministic_train):
            return None
        return DataLoader(self._cached_subset(split, dataset), batch_size=self.dm.batch_size, shuffle=shuffle)

    def _eval_loader(self, split: str, dataset) -> DataLoader:
        if self.feature_cache.enabled:
            return DataLoader(self._cached_subset(split, dataset), batch_size=self.dm.batch_size, shuffle=False)
        return self.dm.make_loader(dataset, shuffle=False)

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

    # ----- checkpoints -----------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STATE_KEY] = {
            "finished": self.finished,
            "memory": self.memory.state_dict(),
            "means": None if self.means is None else self.means.cpu(),
            "rows": self.rows,
            "seen_acc": self.seen_acc,
            "classes_seen": self.classes_seen,
            "class_order": self.class_order,
            "previous_model": self._previous_state(),
            # a task ended but the next one has not started: its optimizer must still be replaced on resume
            "fresh_optimizer": self._fresh_optimizer,
        }

    def _previous_state(self) -> Optional[dict]:
        if self.previous_model is None:
            return None
        state = self.previous_model.state_dict()
        if self.freeze_backbone:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            raise TLError("this checkpoint has no iCaRL state (memory, task index); resume from a checkpoint "
                          "written by ICaRL.")
        self.finished = int(state["finished"])
        self.memory.load_state_dict(state["memory"])
        self.means = state["means"]
        self.rows, self.seen_acc = state["rows"], state["seen_acc"]
        self.classes_seen = list(state["classes_seen"])
        self.class_order = list(state["class_order"])
        self._previous = []
        if state["previous_model"] is not None:
            previous = copy.deepcopy(self.net).eval()  # a frozen backbone is the same in both: not saved twice
            previous.load_state_dict(state["previous_model"], strict=not self.freeze_backbone)
            previous.requires_grad_(False)
            self._previous = [previous]
        self._fresh_optimizer = bool(state.get("fresh_optimizer", False))
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
        self._resume_epoch = int(progress.get("processed", checkpoint.get("epoch", 0)))
        if self.means is not None:
            self.means = self.means.to(self.device)
        if self._trainer is not None and isinstance(self.trainer.datamodule, ClassIncrementalDataModule):
            self._serve_task()

    # ----- results ---------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {clf: summarize(self.rows[clf], self.seen_acc[clf]) for clf in ("nme", "cnn")}

    def results(self) -> dict:
        if not self.rows["cnn"]:
            return {}
        return {"incremental": {"class_order": self.class_order, "classes_seen": self.classes_seen,
                                "tasks_finished": self.finished, "exemplars": len(self.memory),
                                **self.summary()}}

    def write_report(self, run_dir: str) -> None:
        """``incremental.json``, ``incremental_accuracy.png`` and ``accuracy_matrix.png`` in ``run_dir``; the
        scalar metrics also go to the configured loggers."""
        os.makedirs(run_dir, exist_ok=True)
        report = self.results()["incremental"]
        write_text(os.path.join(run_dir, "incremental.json"), json.dumps(report, indent=2))
        curves = {f"iCaRL {clf.upper()}": self.seen_acc[clf] for clf in ("nme", "cnn")}
        plot_accuracy_curve(self.classes_seen, curves, os.path.join(run_dir, "incremental_accuracy.png"))
        plot_accuracy_matrices({clf.upper(): self.rows[clf] for clf in ("nme", "cnn")},
                               os.path.join(run_dir, "accuracy_matrix.png"))
        scalars = flat_metrics(self.summary())
        for logger in self.loggers:
            logger.log_metrics(scalars, step=self.global_step)
