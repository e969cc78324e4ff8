"""Shared behaviour of every method: task loss, metrics per stage, optimizer param groups, prediction.

Multi-class tasks log ``<stage>/acc``; multi-label tasks (targets in {0,1}, -1 = ignore) log ``<stage>/mAP``.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from tl_lightning.backbones import is_convnet
from tl_lightning.errors import TLError
from tl_lightning.methods.epoch_logging import EpochLogging
from tl_lightning.metrics import MultilabelVOCAveragePrecision

STAGES = ("train", "val", "test")


def task_loss(logits: torch.Tensor, targets: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Cross-entropy, or for multi-label binary cross-entropy over the labels that are not ignored (-1)."""
    if not multilabel:
        return F.cross_entropy(logits, targets)
    mask = (targets >= 0).float()
    loss = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0), weight=mask, reduction="sum")
    return loss / mask.sum().clamp(min=1)


def build_metrics(num_classes: int, multilabel: bool) -> MetricCollection:
    if multilabel:
        # area-under-curve AP and the VOC2007 11-point AP, both ignoring targets of -1 (tl_lightning.metrics)
        return MetricCollection({"mAP": MultilabelVOCAveragePrecision(num_classes, method="area"),
                                 "mAP_voc07": MultilabelVOCAveragePrecision(num_classes, method="voc07")})
    return MetricCollection({"acc": MulticlassAccuracy(num_classes=num_classes, average="micro")})


def make_head(in_features: int, num_classes: int, hidden_dim: int = 0, dropout: float = 0.0) -> nn.Module:
    """A linear head, or a one-hidden-layer MLP when ``hidden_dim > 0``."""
    if hidden_dim and hidden_dim > 0:
        return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                             nn.Linear(hidden_dim, num_classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes)) if dropout else \
        nn.Linear(in_features, num_classes)


class TransferModule(EpochLogging, L.LightningModule):
    """Base LightningModule: task facts come from the DataModule (linked by the CLI).

    The model contract, the one way callbacks and speed switches reach into a method (as Lightning's
    ``BaseFinetuning`` reaches ``pl_module.backbone``): every method exposes ``backbone``, the module that holds
    its timm model (what ``channels_last`` and ``compile`` apply to, what a feature read-out runs), and ``head``,
    the module from the backbone's features to the class outputs.
    """

    backbone: nn.Module
    head: nn.Module

    def __init__(
        self,
        num_classes: int = 10,
        multilabel: bool = False,
        class_names: Optional[list[str]] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: str = "epoch",
        channels_last: Union[bool, Literal["auto"]] = "auto",
        compile: bool = False,
    ):
        """
        Args:
            num_classes: number of classes (linked from the DataModule).
            multilabel: multi-label targets (linked from the DataModule).
            class_names: class names (linked from the DataModule), carried into predictions and metrics.json.
            lr: learning rate of the head (other groups are derived from it where a method has them).
            weight_decay: weight decay of every param group.
            optimizer: any torch optimizer, e.g. ``{class_path: torch.optim.SGD, init_args: {momentum: 0.9}}``.
            scheduler: any torch LR scheduler, e.g. ``{class_path: torch.optim.lr_scheduler.CosineAnnealingLR}``.
            scheduler_interval: ``epoch`` or ``step``.
            channels_last: NHWC memory layout for the backbone and the image batches. ``auto`` (default): on for
                convolutional backbones without attention blocks (measured on CPU, ``bench/perf.py``: 1.77x faster
                FineTune steps with EfficientNet-Lite0; on GPUs it is the layout of fast convolutions with mixed
                precision), off for transformers; ``true``/``false`` force it.
            compile: ``torch.compile`` the backbone (in place; checkpoints keep their parameter names).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.channels_last = channels_last
        self.compile_backbone = compile  # not ``self.compile``: that is nn.Module's method
        # keys "<stage>_" because nn.Module already owns the attribute "train"
        self.metrics = nn.ModuleDict({f"{s}_": build_metrics(num_classes, multilabel).clone(prefix=f"{s}/")
                                      for s in STAGES})

    # ----- weights -------------------------------------------------------------------------------------------
    #: attributes memoising an identity of the weights (cache keys): cleared whenever a state dict is loaded
    WEIGHT_MEMOS = ("_weights_id",)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        for name in self.WEIGHT_MEMOS:  # new weights: the feature cache key is recomputed from them
            self.__dict__.pop(name, None)
        return result

    # ----- speed switches (on ``backbone``, the model contract) ---------------------------------------
    @property
    def uses_channels_last(self) -> bool:
        """``channels_last`` resolved: ``auto`` means on for a convolutional backbone without attention."""
        if self.channels_last != "auto":
            return bool(self.channels_last)
        return is_convnet(self.backbone)

    def configure_model(self) -> None:
        backbone = self.backbone
        self._channels_last = self.uses_channels_last
        if self._channels_last:
            backbone.to(memory_format=torch.channels_last)
        if self.compile_backbone and not getattr(backbone, "_compiled_call_impl", None):
            backbone.compile()  # in place: the state dict keeps its keys

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not getattr(self, "_channels_last", False):  # set by configure_model
            return batch
        return apply_to_collection(batch, torch.Tensor,
                                   lambda t: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t)

    def required_datamodule(self, cls: type, hint: str):
        """The trainer's DataModule, which this method needs to be a ``cls``; else one clear sentence."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if not isinstance(dm, cls):
            raise TLError(f"{self.__class__.__name__} needs a {cls.__name__}; {hint}")
        return dm

    # ----- metrics ---------------------------------------------------------------------------------------
    @property
    def monitor(self) -> tuple[str, str]:
        """(metric, mode) that selects the best checkpoint."""
        return ("val/mAP", "max") if self.multilabel else ("val/acc", "max")

    @property
    def selectable(self) -> bool:
        """Whether this epoch's model may become the best checkpoint (``BestCheckpoint``); a method says no for
        epochs that do not train the model it reports (e.g. ``DomainAdaptation``'s source stage)."""
        return True

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return task_loss(logits, targets, self.multilabel)

    def log_metrics(self, stage: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Update the stage's metrics with a batch; they are logged as epoch values (``EpochLogging``)."""
        metrics = self.metrics[f"{stage}_"]
        metrics.update(logits, targets.long() if self.multilabel else targets)
        self.log_metric_objects(f"{stage}/metrics", metrics, prog_bar=stage != "train")

    def supervised_step(self, stage: str, batch, forward=None) -> torch.Tensor:
        """Forward a labelled ``(x, y)`` batch (through ``forward``, default the module), log ``<stage>/loss``
        and the stage's metrics as epoch means (over all DDP processes), return the loss."""
        x, y = batch
        logits = (forward or self)(x)
        loss = self.loss(logits, y)
        self.log_epoch_mean(f"{stage}/loss", loss, len(y), prog_bar=stage == "train")
        self.log_metrics(stage, logits, y)
        return loss

    # ----- optimisation -------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Param groups for the optimizer; methods with layer groups override this."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.lr, "name": "head"}]

    def configure_optimizers(self):
        groups = [dict(g, weight_decay=g.get("weight_decay", self.weight_decay)) for g in self.param_groups()]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    # ----- prediction and results ---------------------------------------------------------------------------
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(x)
        if self.multilabel:
            probs = logits.sigmoid()
        else:
            probs = logits.softmax(-1)
        score, pred = probs.max(-1)
        return {"pred": pred, "score": score, "probs": probs}

    def results(self) -> dict:
        """Extra, method-specific entries for ``metrics.json`` (e.g. an accuracy matrix)."""
        return {}
