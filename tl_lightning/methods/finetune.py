"""Fine-tuning: a pretrained timm backbone, a new task head, layer groups with their own learning rates, and a
staged-unfreezing strategy (``tl_lightning.callbacks.unfreeze``).

Layer groups come from the backbone's own timm ``group_matcher`` (stem, stages or blocks; ``coarse_groups``
picks whole stages), plus the task head. The head trains at ``lr``; each group below it at ``lr_decay`` times
the group above (discriminative fine-tuning, ULMFiT: Howard & Ruder 2018, factor 1/2.6), unless ``group_lrs``
names it explicitly.

How the pitfalls of Lightning's ``BackboneFinetuning`` are avoided:

* every group is a named param group of the optimizer from the first step (none is added later), so any
  scheduler covers all of them for the whole run and a checkpoint's optimizer state always fits;
* freezing never touches learning rates (no hidden ÷10); frozen parameters get no gradient, so no optimizer
  (momentum, weight decay) moves them;
* BatchNorm layers of frozen groups are put back into eval mode after every ``model.train()`` unless
  ``train_bn`` (then their statistics and affine parameters keep training, as the name says);
* the phase is a function of the epoch, applied at each epoch start after a checkpoint's loop state is restored,
  so a resumed run continues in the phase it was in;
* on one device frozen parameters have ``requires_grad=False`` (no backward through frozen early layers); under
  DDP (``world_size > 1``) every parameter keeps ``requires_grad=True`` (DDP's reducer is built once) and the
  gradients of frozen parameters are dropped after the all-reduce, before the optimizer step;
* learning rates are logged per group name: ``lr/head``, ``lr/blocks.5``... (0 while a group is frozen).
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from typing import Optional, Union

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from tl_lightning.backbones import DEFAULT_BACKBONE, create_backbone, layer_groups
from tl_lightning.callbacks.unfreeze import UnfreezeStrategy, make_strategy
from tl_lightning.data.base import TLDataModule
from tl_lightning.errors import TLError
from tl_lightning.feature_cache import extract_features
from tl_lightning.methods.base import TransferModule, make_head

HEAD = "head"
ULMFIT_DECAY = 1 / 2.6


class FineTune(TransferModule):
    """A timm backbone plus a new head, trained with per-group learning rates and staged unfreezing."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "bundled",
        unfreeze: Union[str, UnfreezeStrategy] = "freeze_unfreeze",
        lr_decay: float = ULMFIT_DECAY,
        group_lrs: Optional[dict[str, float]] = None,
        coarse_groups: bool = True,
        train_bn: bool = False,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            backbone: any timm model name (it needs a ``group_matcher``, as timm's models have).
            weights: ``bundled``, ``hub``, ``none`` or a checkpoint path.
            unfreeze: ``freeze``, ``no_freeze``, ``freeze_unfreeze``, ``milestones``, ``gradual``, ``lp_ft``, or
                ``{class_path: tl_lightning.callbacks.unfreeze.<Strategy>, init_args: {...}}``.
            lr_decay: each group's learning rate is this times the one of the group above it (head = ``lr``);
                1.0 gives every group the head's rate.
            group_lrs: explicit learning rates by group name or glob pattern (``{"blocks.6": 1e-3, "*": 1e-5}``;
                the first matching entry wins); groups left out follow ``lr_decay``. ``head`` sets the head's.
            coarse_groups: timm's coarse grouping (whole stages: ``blocks.5``) instead of single blocks.
            train_bn: keep BatchNorm layers of frozen groups training (statistics and affine parameters).
            hidden_dim: 0 for a linear head, else the hidden width of a one-layer MLP head.
            dropout: dropout before the head's output layer.
        """
        super().__init__(**kwargs)
        if lr_decay <= 0:
            raise TLError(f"lr_decay must be > 0 (got {lr_decay}); e.g. --model.lr_decay=0.385 (ULMFiT's 1/2.6).")
        self.unfreeze = make_strategy(unfreeze)
        for hparams in (self.hparams, getattr(self, "_hparams_initial", {})):
            hparams["unfreeze"] = self.unfreeze.config()  # plain values: checkpoints load with weights_only
        self.backbone_name = backbone
        self.lr_decay = lr_decay
        self.train_bn = train_bn
        self.backbone = create_backbone(backbone, weights, num_classes=0)
        features = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = make_head(features, self.num_classes, hidden_dim, dropout)
        self.groups = self._build_groups(coarse_groups)
        self.group_lr = self._resolve_lrs(group_lrs or {})
        self._bn_groups = self._batchnorm_groups()
        self.trainable: set[str] = set(self.groups)  # every group trains until a strategy says otherwise
        self._frozen_names: set[str] = set()
        self.probe_train_acc: Optional[float] = None

    # ----- layer groups -------------------------------------------------------------------------------------
    def _build_groups(self, coarse: bool) -> "OrderedDict[str, list[str]]":
        """Group name -> parameter names (of this module), input to output, the task head last."""
        groups: OrderedDict[str, list[str]] = OrderedDict()
        for name, params in layer_groups(self.backbone, coarse=coarse).items():
            groups[f"backbone.{name}" if name == HEAD else name] = [f"backbone.{p}" for p in params]
        groups[HEAD] = [f"head.{n}" for n, _ in self.head.named_parameters()]
        return groups

    @property
    def group_names(self) -> list[str]:
        return list(self.groups)

    @property
    def backbone_group_names(self) -> list[str]:
        """Backbone groups, input to output (what an unfreeze strategy chooses from)."""
        return [g for g in self.groups if g != HEAD]

    def _resolve_lrs(self, explicit: dict[str, float]) -> dict[str, float]:
        names = self.group_names
        unused = [pattern for pattern in explicit if not any(fnmatch.fnmatchcase(g, pattern) for g in names)]
        if unused:
            raise TLError(f"group_lrs key(s) {unused} match no layer group; the groups are {', '.join(names)}.")
        lrs = {}
        for depth, group in enumerate(reversed(names)):  # the head is depth 0
            match = next((pattern for pattern in explicit if pattern == group), None) or \
                next((pattern for pattern in explicit if fnmatch.fnmatchcase(group, pattern)), None)
            lrs[group] = float(explicit[match]) if match is not None else self.lr * self.lr_decay ** depth
        return {g: lrs[g] for g in names}

    def _batchnorm_groups(self) -> list[tuple[str, str]]:
        """(module name, group) of every BatchNorm layer of the backbone."""
        owner = {p: g for g, params in self.groups.items() for p in params}
        out = []
        for name, module in self.named_modules():
            if not isinstance(module, _BatchNorm) or not name.startswith("backbone."):
                continue
            # an affine BatchNorm belongs to its weight's group; one without parameters to the closest name
            group = owner.get(f"{name}.weight") or owner[max(owner, key=lambda p: len(_common_prefix(name, p)))]
            out.append((name, group))
        return out

    # ----- freezing -----------------------------------------------------------------------------------------
    @property
    def grads_masked(self) -> bool:
        """Under DDP frozen parameters keep ``requires_grad`` and their gradients are dropped instead."""
        return self._trainer is not None and self.trainer.world_size > 1

    def set_trainable_groups(self, backbone_groups: list[str]) -> None:
        """Train the head and ``backbone_groups``; freeze every other group (BatchNorm too, unless ``train_bn``)."""
        unknown = set(backbone_groups) - set(self.groups)
        if unknown:
            raise TLError(f"unknown layer group(s) {sorted(unknown)}; the groups are {', '.join(self.groups)}.")
        self.trainable = set(backbone_groups) | {HEAD}
        bn_params = {f"{m}.{p}" for m, _ in self._bn_groups for p in ("weight", "bias")} if self.train_bn else set()
        params = dict(self.named_parameters())
        masked = self.grads_masked
        self._frozen_names = set()
        for group, names in self.groups.items():
            for name in names:
                trains = group in self.trainable or name in bn_params
                if not trains:
                    self._frozen_names.add(name)
                params[name].requires_grad_(trains or masked)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and not self.train_bn:
            for name, group in getattr(self, "_bn_groups", ()):
                if group not in self.trainable:
                    self.get_submodule(name).eval()  # frozen statistics stay as pretrained
        return self

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._frozen_names:
            for name, p in self.named_parameters():
                if name in self._frozen_names:
                    p.grad = None  # no update, no momentum, no weight decay for a frozen group

    # ----- LP-FT's linear probe (Kumar et al. 2022) ----------------------------------------------------------
    def fit_linear_probe(self, steps: int, l2: float) -> None:
        """Fit the head on the frozen backbone's features of the training split (deterministic transforms, eval
        mode): ``steps`` full-batch L-BFGS steps on the task loss plus ``l2`` times the squared weights. Under DDP
        rank 0's head is broadcast, so every rank starts the same."""
        dm = self.trainer.datamodule
        loader = (dm.make_loader(dm.split_dataset("train", deterministic=True), shuffle=False)
                  if isinstance(dm, TLDataModule) else self.trainer.train_dataloader)
        data = extract_features(self.backbone, loader, self.device, desc="linear probe")
        x, y = data["features"].to(self.device), data["targets"].to(self.device)
        head, was_training = self.head, self.head.training
        head.train(False)  # no dropout noise in a full-batch fit
        weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
        optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = self.loss(head(x), y) + l2 * sum((w ** 2).sum() for w in weights)
            loss.backward()
            return loss

        with torch.enable_grad():
            for p in head.parameters():
                p.requires_grad_(True)
            optimizer.step(closure)
        for p in head.parameters():
            p.grad = None
        head.train(was_training)
        if self.trainer.world_size > 1:
            state = self.trainer.strategy.broadcast({k: v.detach().cpu() for k, v in head.state_dict().items()}, src=0)
            head.load_state_dict(state)
        if y.ndim == 1:
            with torch.no_grad():
                self.probe_train_acc = (head(x).argmax(-1) == y).float().mean().item()

    # ----- optimisation -------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        params = dict(self.named_parameters())
        return [{"params": [params[n] for n in names], "lr": self.group_lr[g], "name": g}
                for g, names in self.groups.items()]

    def configure_callbacks(self):
        return [self.unfreeze]

    def current_lrs(self) -> dict[str, float]:
        """Learning rate each group trains at now: the optimizer's (scheduled) rate, 0 while frozen."""
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)
        return {g["name"]: (float(g["lr"]) if g["name"] in self.trainable else 0.0) for g in optimizer.param_groups}

    # ----- steps --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.log_rates(batch_idx)
        return self.supervised_step("train", batch)

    def log_rates(self, batch_idx: int) -> None:
        """The groups' learning rates and the unfrozen group count as step values: every logged step row holds
        the current ones (like LearningRateMonitor), and so does ``callback_metrics`` at an epoch's end.

        Lightning writes the last value logged for a step metric at every logging step, so the values are handed
        to ``self.log`` only at an epoch's first batch and when they change (a per-step scheduler, an unfreezing),
        not every step: each call costs about 0.3 ms, and a Lite0 run logs ten of them (3 ms, 3 % of a 32 px
        training step on a CPU)."""
        values = {f"lr/{g}": lr for g, lr in self.current_lrs().items()}
        values["unfrozen_groups"] = float(len(self.trainable) - 1)
        if batch_idx == 0 or values != getattr(self, "_logged_rates", None):
            self.log_dict(values, on_step=True, on_epoch=False)
            self._logged_rates = values

    def validation_step(self, batch, batch_idx: int) -> None:
        self.supervised_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self.supervised_step("test", batch)

    def results(self) -> dict:
        out = {"layer_groups": self.group_names, "unfreeze": self.unfreeze.config()}
        if self.probe_train_acc is not None:
            out["probe_train_acc"] = self.probe_train_acc
        return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]
