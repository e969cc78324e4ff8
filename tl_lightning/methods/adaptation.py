"""Domain adaptation after Tzeng, Hoffman, Darrell & Saenko, "Simultaneous Deep Transfer Across Domains and
Tasks" (ICCV 2015), with DANN's gradient reversal (Ganin & Lempitsky, ICML 2015) as the unsupervised variant.

One network ``classifier(features(x))`` plus a domain classifier on the features, trained with manual
optimisation and two optimizers (one owns the feature extractor and classifier, one the domain classifier):

* **L_C** - cross-entropy on the source labels and on the k labelled target samples per class;
* **L_D** - the domain classifier's cross-entropy (source = 0, target = 1) on detached features, its own step;
* **L_conf** (``confusion: uniform``) - the representation step: cross-entropy of the domain classifier's
  prediction against the *uniform* domain distribution, weighted by λ; it alternates with the L_D step;
  ``confusion: gradient_reversal`` (DANN) is one step through a gradient-reversal layer scaled by λ (times λ_p);
  ``confusion: none`` trains the domain classifier only as a probe of how separable the domains are;
* **L_soft** - cross-entropy of the labelled target's prediction at temperature τ against the soft labels, the
  per-class mean softmax at τ of a source-trained model (``source_stage.py``: a ``source_checkpoint`` or the
  first ``source_pretrain_epochs`` epochs of the fit), weighted by ν.

The pieces, one concern each: ``source_stage.py`` (the source model, soft labels and the stage's epochs),
``adaptation_schedule.py`` (λ_p, μ_p), ``domain_evaluation.py`` (per-domain evaluation, the best checkpoint's
metric, DEV), ``domain_statistics.py`` (per-domain BatchNorm, ``domain_batchnorm``). Baselines from the same
module: ``mode: source_only`` and ``mode: target_only`` (with ``labelled_per_class: null``: train-on-target).

Logged: ``train/loss`` and every term (``loss_cls``, ``loss_domain``, ``loss_conf``, ``loss_soft``), ``train/lambda``,
``train/{source,target,domain}_acc``; ``{val,test}/{target,source,domain}_acc`` (domain: balanced, 50% = confused).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from tl_lightning.backbones import create_backbone
from tl_lightning.backbones.features import conv_feature_dim
from tl_lightning.data.domains import DomainPairDataModule
from tl_lightning.errors import TLError
from tl_lightning.losses import confusion_loss, domain_loss, grad_reverse, soft_label_loss
from tl_lightning.methods.adaptation_schedule import AdaptationSchedule
from tl_lightning.methods.base import TransferModule, make_head
from tl_lightning.methods.dev_risk import OneStandardErrorRule
from tl_lightning.methods.domain_evaluation import DomainEvaluation, domain_evaluation_metrics
from tl_lightning.methods.domain_statistics import SOURCE, TARGET, add_target_statistics, target_statistics
from tl_lightning.methods.source_stage import SourceStage, source_model


class DomainAdaptation(SourceStage, AdaptationSchedule, DomainEvaluation, TransferModule):
    """Tzeng et al. (2015) domain confusion + soft labels, DANN, and the source-only / train-on-target baselines."""

    def __init__(
        self,
        backbone: str = "digit_cnn_dann",
        weights: str = "none",
        mode: Literal["adapt", "source_only", "target_only"] = "adapt",
        confusion: Literal["uniform", "gradient_reversal", "none"] = "uniform",
        confusion_weight: float = 0.1,
        lambda_schedule: bool = True,
        lr_annealing: bool = False,
        domain_batchnorm: bool = False,
        soft_label_weight: float = 0.0,
        temperature: float = 2.0,
        source_checkpoint: Optional[str] = None,
        init_from_source: bool = True,
        source_pretrain_epochs: int = 0,
        domain_hidden_dim: int = 100,
        domain_input: Literal["embedding", "conv"] = "embedding",
        selection: Literal["auto", "dev", "dev_min", "target_acc"] = "auto",
        domain_lr: Optional[float] = None,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            backbone: any timm model name (trained here; ``digit_cnn_dann`` for 32 px digits, no BatchNorm).
            weights: ``bundled``, ``hub``, ``none`` or a checkpoint path.
            mode: ``adapt``, or the baselines ``source_only`` and ``target_only``.
            confusion: ``uniform`` (Tzeng et al.), ``gradient_reversal`` (DANN) or ``none``.
            confusion_weight: λ, the weight of L_conf (or the GRL's scale).
            lambda_schedule: multiply λ by DANN's λ_p = 2/(1+exp(-10p)) - 1 (p = training progress).
            lr_annealing: Ganin & Lempitsky's per-step learning-rate annealing μ_p = μ_0 / (1 + 10p)^0.75 for
                both optimizers (used when no ``scheduler`` is given).
            domain_batchnorm: per-domain BatchNorm statistics (needs a backbone with BatchNorm, e.g. ``digit_cnn``):
                source and target are forwarded separately in training, and each domain is evaluated with its
                own running statistics; ``forward`` (prediction) uses the target's.
            soft_label_weight: ν, the weight of L_soft (0 = no soft labels).
            temperature: τ of the soft labels and of the target prediction they are compared with.
            source_checkpoint: checkpoint of a source-trained DomainAdaptation (a ``source_only`` run): the
                model the soft labels come from.
            init_from_source: warm start: the network starts from ``source_checkpoint``'s weights, or is itself
                the one pre-trained for ``source_pretrain_epochs``. ``false``: the network starts from its
                initial weights, and the pre-training epochs train a separate copy as the soft labels' teacher
                (none without soft labels: then there is no source stage).
            source_pretrain_epochs: the source stage: the first epochs of the fit's loop (counted in the trainer's
                ``max_epochs``), trained on the source alone before adaptation and soft labels.
            domain_hidden_dim: hidden width of the domain classifier (0 = linear).
            domain_input: what the domain classifier reads: ``embedding`` (the backbone's pooled output, which
                the classifier reads too) or ``conv`` (the flattened output of ``forward_features``, the last
                conv block; the classifier then reads ``forward_head(pre_logits=True)``). ``conv`` with
                ``digit_cnn_dann`` is DANN's network as published: the reversed gradient reaches the conv layers
                only, and the label predictor keeps fc100-fc100-fc10 to itself.
            selection: the metric of the best checkpoint: ``target_acc`` (needs target validation labels),
                ``dev`` (DEV, You et al. 2019: label-free, from source validation losses and unlabelled target
                images; the latest epoch whose ``val/dev_risk`` is within one standard error of the lowest,
                ``val/dev_score``), ``dev_min`` (the epoch of the lowest ``val/dev_risk``) or ``auto`` (``dev``
                when the target has no labelled samples, k = 0, else ``target_acc``).
            domain_lr: learning rate of the domain classifier; default ``lr``.
            hidden_dim: 0 for a linear classifier, else the hidden width of an MLP classifier.
            dropout: dropout before the classifier's output layer.
        """
        super().__init__(**kwargs)
        self.automatic_optimization = False
        if temperature <= 0:
            raise TLError("temperature must be > 0; fix --model.init_args.temperature.")
        if domain_batchnorm and mode != "adapt":
            raise TLError(f"domain_batchnorm keeps one set of BatchNorm statistics per domain, and mode {mode} "
                          "trains on one domain only, so the other's would never be estimated; set "
                          "domain_batchnorm: false for the baselines.")
        if selection.startswith("dev") and self.multilabel:
            raise TLError("selection: dev needs single-label classes; use selection: target_acc for a multi-label task.")
        if soft_label_weight > 0 and self.multilabel:
            raise TLError("soft labels need single-label classes; set soft_label_weight: 0 for a multi-label task.")
        self.backbone_name = backbone
        self.mode = mode
        self.confusion = confusion
        self.confusion_weight = confusion_weight
        self.lambda_schedule = lambda_schedule
        self.lr_annealing = lr_annealing
        self.soft_label_weight = soft_label_weight
        self.temperature = temperature
        self.source_checkpoint = source_checkpoint
        self.init_from_source = init_from_source
        self.source_pretrain_epochs = source_pretrain_epochs
        self.domain_lr = domain_lr
        self.features = create_backbone(backbone, weights, num_classes=0)
        feature_dim = self.features.num_features
        self.domain_batchnorm = domain_batchnorm
        if domain_batchnorm and not add_target_statistics(self.features):
            raise TLError(f"domain_batchnorm needs BatchNorm layers and backbone '{backbone}' has none; use a "
                          "backbone with BatchNorm (e.g. digit_cnn) or set domain_batchnorm: false.")
        self.classifier = make_head(feature_dim, self.num_classes, hidden_dim, dropout)
        self.domain_input = domain_input
        self.domain_dim = feature_dim if domain_input == "embedding" else conv_feature_dim(self.features)
        self.domain_classifier = make_head(self.domain_dim, 2, domain_hidden_dim)
        self.selection = selection
        self.dev_rule = OneStandardErrorRule()
        self._dev_parts: dict[str, list[torch.Tensor]] = {}
        self.register_buffer("soft_labels", torch.full((self.num_classes, self.num_classes), 1.0 / self.num_classes))
        # set once the source stage (pre-training, soft labels) is done; saved in checkpoints, so resumes skip it
        self.register_buffer("source_stage_done", torch.tensor(False))
        self.eval_metrics, self.domain_metrics = domain_evaluation_metrics(self.num_classes, self.multilabel)
        self.pretrain_history: list[float] = []  # the source stage's mean loss per epoch
        # init_from_source: false with soft labels: the source stage trains this copy (the teacher), with its own
        # optimizer, while the network keeps its initial weights; a submodule, so a resumed stage continues it
        needs_copy = (mode == "adapt" and soft_label_weight > 0 and not init_from_source and not source_checkpoint
                      and source_pretrain_epochs > 0)
        self.teacher = source_model(self.features, self.classifier) if needs_copy else None

    # ----- network -------------------------------------------------------------------------------------------
    backbone = property(lambda self: self.features, doc="The model contract's name for ``features``.")
    head = property(lambda self: self.classifier, doc="The model contract's name for ``classifier``.")

    def trunk(self, x: torch.Tensor, domain: int = TARGET) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the domain classifier reads, what the classifier reads) for images from ``domain``, normalised
        with that domain's statistics under ``domain_batchnorm``; the same tensor unless ``domain_input: conv``."""
        with target_statistics(self.features, active=self.domain_batchnorm and domain == TARGET):
            if self.domain_input == "embedding":
                features = self.features(x)
                return features, features
            conv = self.features.forward_features(x)
            flat = conv.flatten(1)
            if flat.shape[1] != self.domain_dim:
                raise TLError(f"domain_input: conv gives {flat.shape[1]} features at this image size, and the "
                              f"domain classifier was built for {self.domain_dim}; use the backbone's input size "
                              "or domain_input: embedding.")
            return flat, self.features.forward_head(conv, pre_logits=True)

    def embed(self, x: torch.Tensor, domain: int = TARGET) -> torch.Tensor:
        """What the classifier reads for images from ``domain``."""
        return self.trunk(x, domain)[1]

    def forward(self, x: torch.Tensor, domain: int = TARGET) -> torch.Tensor:
        """Logits; predictions are for the target domain."""
        return self.classifier(self.embed(x, domain))

    def model_parameters(self) -> list[nn.Parameter]:
        """What the first optimizer owns: feature extractor and classifier."""
        return list(self.features.parameters()) + list(self.classifier.parameters())

    def configure_optimizers(self):
        def optimizer(params, lr: float, name: str):
            return self.optimizer_factory([{"params": list(params), "lr": lr, "weight_decay": self.weight_decay,
                                            "name": name}])

        model_opt = optimizer(self.model_parameters(), self.lr, "model")
        domain_opt = optimizer(self.domain_classifier.parameters(), self.domain_lr or self.lr, "domain")
        teacher_opt = [] if self.teacher is None else [optimizer(self.teacher.parameters(), self.lr, "teacher")]
        optimizers = [model_opt, domain_opt] + teacher_opt
        schedulers = self.learning_rate_schedulers([model_opt, domain_opt])  # the teacher's lr stays constant
        return (optimizers, schedulers) if schedulers else optimizers

    # ----- training --------------------------------------------------------------------------------------------
    def _log(self, name: str, value, batch_size: int) -> None:
        self.log_epoch_mean(f"train/{name}", value, batch_size, prog_bar=name in ("loss", "domain_acc"))

    def _log_acc(self, name: str, logits: torch.Tensor, y: torch.Tensor) -> None:
        if not self.multilabel and len(y):
            self._log(name, (logits.argmax(-1) == y).float().mean(), len(y))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        if self.in_source_stage:
            return self._source_step(batch)
        model_opt, domain_opt = self.optimizers()[:2]
        if self.mode != "adapt":
            domain = SOURCE if self.mode == "source_only" else TARGET
            x, y = batch["source"] if domain == SOURCE else batch["target_labelled"]
            self._supervised_step(model_opt, self(x, domain), y, "source_acc" if domain == SOURCE else "target_acc")
            self._step_schedulers("step")
            return

        x_s, y_s = batch["source"]
        x_l, y_l = batch.get("target_labelled", (x_s[:0], y_s[:0]))
        x_u = batch["target_unlabelled"]
        n_s, n_l = len(x_s), len(x_l)
        if self.domain_batchnorm:  # each domain normalised with its own batch statistics
            parts = [self.trunk(x_s, SOURCE), self.trunk(torch.cat([x_l, x_u]), TARGET)]
            features, label_features = (torch.cat(pair) for pair in zip(*parts))
        else:
            features, label_features = self.trunk(torch.cat([x_s, x_l, x_u]))
        logits = self.classifier(label_features[: n_s + n_l])
        y = torch.cat([y_s, y_l])
        loss_cls = self.loss(logits, y)
        domains = torch.cat([torch.full((n_s,), SOURCE), torch.full((len(features) - n_s,), TARGET)]).to(self.device)
        weight = self.adaptation_weight()
        loss = loss_cls

        if self.confusion == "gradient_reversal":
            # DANN: one backward trains the domain classifier on L_D and the features against it
            domain_logits = self.domain_classifier(grad_reverse(features, weight))
            loss_domain = domain_loss(domain_logits, domains)
            loss = loss + loss_domain
        else:
            # L_D step on detached features: only the domain classifier moves
            domain_logits = self.domain_classifier(features.detach())
            loss_domain = domain_loss(domain_logits, domains)
            self._step(domain_opt, loss_domain)
            if self.confusion == "uniform":
                self.toggle_optimizer(model_opt)  # the domain classifier is fixed during the confusion step
                loss_conf = confusion_loss(self.domain_classifier(features), domains)
                self.untoggle_optimizer(model_opt)
                loss = loss + weight * loss_conf
                self._log("loss_conf", loss_conf, len(features))
        if self.uses_soft_labels and n_l:
            loss_soft = soft_label_loss(logits[n_s:], self.soft_labels[y_l], self.temperature)
            loss = loss + self.soft_label_weight * loss_soft
            self._log("loss_soft", loss_soft, n_l)

        if self.confusion == "gradient_reversal":
            model_opt.zero_grad()
            domain_opt.zero_grad()
            self.manual_backward(loss)
            model_opt.step()
            domain_opt.step()
        else:
            self._step(model_opt, loss)

        self._log("loss", loss, len(features))
        self._log("loss_cls", loss_cls, n_s + n_l)
        self._log("loss_domain", loss_domain, len(features))
        self._log("lambda", weight, len(features))
        self._log("domain_acc", (domain_logits.argmax(-1) == domains).float().mean(), len(features))
        self._log_acc("source_acc", logits[:n_s], y_s)
        self._log_acc("target_acc", logits[n_s:], y_l)
        self._step_schedulers("step")

    def _supervised_step(self, optimizer, logits: torch.Tensor, y: torch.Tensor, acc_name: str) -> torch.Tensor:
        """L_C alone, one step of ``optimizer`` (the baselines, the source stage); logged as loss and loss_cls."""
        loss = self.loss(logits, y)
        self._step(optimizer, loss)
        self._log("loss", loss, len(y))
        self._log("loss_cls", loss, len(y))
        self._log_acc(acc_name, logits, y)
        return loss

    def _step(self, optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()

    def on_train_epoch_end(self) -> None:
        if self.in_source_stage:
            self._end_source_epoch()
            return
        self._step_schedulers("epoch")

    def results(self) -> dict:
        out = {"mode": self.mode, "confusion": self.confusion if self.mode == "adapt" else None,
               "source_pretrain_loss": self.pretrain_history}
        if self.uses_soft_labels:
            out["soft_labels"] = self.soft_labels.tolist()
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(dm, DomainPairDataModule):
            out["data_sizes"] = dm.sizes()
        return out
