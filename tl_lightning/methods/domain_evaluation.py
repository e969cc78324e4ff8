"""Evaluation of ``DomainAdaptation``: each domain on its own loader, the domain classifier's balanced accuracy,
and the checkpoint criterion: ``val/target_acc``, or without target labels DEV (Deep Embedded Validation, You et
al., ICML 2019), the source validation loss weighted by a domain discriminator's density ratios, chosen by the
one-standard-error rule (``val/dev_score``) or at its lowest (``val/dev_risk``).

``DomainEvaluation`` is a mixin of the LightningModule: it reads the module's ``trunk``, ``classifier``,
``domain_classifier``, ``selection`` and ``multilabel``, and owns the metrics ``domain_evaluation_metrics``
builds and the ``dev_rule`` state (saved in checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from tl_lightning.data.domains import EVAL_DOMAINS, DomainPairDataModule
from tl_lightning.methods.base import build_metrics, task_loss
from tl_lightning.methods.dev_risk import OneStandardErrorRule, density_ratios, dev_estimate
from tl_lightning.methods.domain_statistics import SOURCE, TARGET


def domain_evaluation_metrics(num_classes: int, multilabel: bool) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """(the task metrics of every stage and domain, the domain classifier's accuracy per stage), the latter
    balanced over the two domains (mean of per-domain recall): 50% when the domains are confused."""
    task = nn.ModuleDict({f"{stage}_{domain}": build_metrics(num_classes, multilabel).clone(prefix=f"{stage}/{domain}_")
                          for stage in ("val", "test") for domain in EVAL_DOMAINS})
    domain = nn.ModuleDict({stage: MulticlassAccuracy(num_classes=2, average="macro") for stage in ("val", "test")})
    return task, domain


class DomainEvaluation:
    """Validation and test of both domains, and the best checkpoint's metric (``monitor``)."""

    dev_rule: OneStandardErrorRule

    @property
    def selects_by_dev(self) -> bool:
        """Whether the best checkpoint follows DEV (``selection`` ``dev`` or ``dev_min``; ``auto``: when k = 0)."""
        if self.selection != "auto":
            return self.selection.startswith("dev")
        dm = self.trainer.datamodule if self._trainer is not None else None
        return not self.multilabel and isinstance(dm, DomainPairDataModule) and dm.labelled_per_class == 0

    @property
    def monitor(self) -> tuple[str, str]:
        if self.selects_by_dev:
            return ("val/dev_risk", "min") if self.selection == "dev_min" else ("val/dev_score", "min")
        return ("val/target_mAP", "max") if self.multilabel else ("val/target_acc", "max")

    @property
    def later_ties_win(self) -> bool:
        """Of two epochs with the same ``monitor`` value the later is the best checkpoint (``BestCheckpoint``):
        the one-standard-error rule gives every epoch it accepts the same score, the lowest risk so far."""
        return self.monitor[0] == "val/dev_score"

    def _eval_step(self, stage: str, batch, dataloader_idx: int) -> None:
        domain = EVAL_DOMAINS[dataloader_idx]
        x, y = batch
        label = SOURCE if domain == "source" else TARGET
        features, label_features = self.trunk(x, label)
        logits = self.classifier(label_features)
        self.log_epoch_mean(f"{stage}/{domain}_loss", task_loss(logits, y, self.multilabel), len(y),
                            add_dataloader_idx=False)
        if stage == "val" and not self.multilabel:  # DEV reads target images, never their labels
            self._dev_parts.setdefault(f"{domain}_features", []).append(label_features.detach().float())
            if domain == "source":
                self._dev_parts.setdefault("source_losses", []).append(
                    F.cross_entropy(logits.detach().float(), y, reduction="none"))
        metrics = self.eval_metrics[f"{stage}_{domain}"]
        metrics.update(logits, y.long() if self.multilabel else y)
        self.log_metric_objects(f"{stage}/{domain}_metrics", metrics, add_dataloader_idx=False,
                                prog_bar=domain == "target")
        domain_logits = self.domain_classifier(features)
        self.domain_metrics[stage].update(domain_logits, torch.full((len(y),), label, device=self.device))

    def _log_domain_acc(self, stage: str) -> None:
        metric = self.domain_metrics[stage]
        self.log(f"{stage}/domain_acc", metric.compute())
        metric.reset()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._dev_parts = {}

    def on_validation_epoch_end(self) -> None:
        self._log_domain_acc("val")
        parts = {name: torch.cat(chunks) for name, chunks in self._dev_parts.items()}
        self._dev_parts = {}
        if len(parts) == 3:
            if self.trainer.world_size > 1:  # every rank scores its shard; the estimate needs them all
                parts = {name: self.all_gather(t).flatten(0, 1) for name, t in parts.items()}
            weights = density_ratios(parts["source_features"].cpu(), parts["target_features"].cpu())
            risk, standard_error = dev_estimate(parts["source_losses"].cpu(), weights)
            self.log("val/dev_risk", risk)
            self.log("val/dev_risk_se", standard_error)
            if not self.trainer.sanity_checking and self.selectable:  # a source-stage epoch is never chosen
                self.log("val/dev_score", self.dev_rule.score(risk, standard_error))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dev_rule"] = self.dev_rule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "dev_rule" in checkpoint:  # a checkpoint written before the rule existed starts it afresh
            self.dev_rule.load_state_dict(checkpoint["dev_rule"])

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_domain_acc("test")
