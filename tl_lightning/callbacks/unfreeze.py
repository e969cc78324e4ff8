"""Staged unfreezing: which layer groups of a :class:`~tl_lightning.methods.FineTune` model train in each epoch.

A strategy is a Lightning callback that the model owns (``FineTune(unfreeze=...)`` returns it from
``configure_callbacks``), so it is chosen in the model's config, by name or by class::

    unfreeze: gradual
    unfreeze: {class_path: tl_lightning.callbacks.unfreeze.FreezeUnfreeze, init_args: {unfreeze_at_epoch: 2}}

A strategy is a pure function of the epoch: ``trainable_top(epoch, n)`` says how many backbone groups,
counted from the output side, train in that epoch (the task head always trains). It is applied at the start of
every training epoch, after Lightning has restored a checkpoint's loop state, so a resumed run continues in
the phase of the epoch it resumes at. The model keeps every group in the optimizer from the first step and
never changes learning rates, so schedulers cover all groups for the whole run and no ``÷10`` sneaks in.

Strategies: ``freeze`` (head only), ``no_freeze``, ``freeze_unfreeze`` (everything at epoch E),
``milestones`` (top N groups at E1, the rest at E2), ``gradual`` (one more group per epoch, top down, after
ULMFiT: Howard & Ruder 2018) and ``lp_ft`` (a linear probe, then full fine-tuning: Kumar et al. 2022).
"""
from __future__ import annotations

import inspect
from typing import Union

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from tl_lightning.errors import TLError
from tl_lightning.instantiate import instantiate


class UnfreezeStrategy(Callback):
    """Base class: maps an epoch to the number of trainable backbone groups, counted from the top."""

    name = "base"

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        raise NotImplementedError

    def trainable_groups(self, epoch: int, group_names: list[str]) -> list[str]:
        """The backbone groups (``group_names`` ordered input to output) that train in ``epoch``."""
        top = max(0, min(len(group_names), int(self.trainable_top(epoch, len(group_names)))))
        return group_names[len(group_names) - top:]

    def config(self) -> dict:
        """``{class_path, init_args}`` of plain values (stored in the model's hyperparameters)."""
        params = inspect.signature(type(self).__init__).parameters
        args = {k: getattr(self, k) for k in params if k != "self" and hasattr(self, k)}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                "init_args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}

    # ----- Lightning hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if not hasattr(pl_module, "set_trainable_groups"):
            raise TLError(f"the unfreeze strategy '{self.name}' needs a FineTune model, not "
                          f"{pl_module.__class__.__name__}; set it as --model.unfreeze of "
                          "tl_lightning.methods.FineTune.")

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        names = self.trainable_groups(trainer.current_epoch, pl_module.backbone_group_names)
        pl_module.set_trainable_groups(names)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config()["init_args"].items())
        return f"{type(self).__name__}({args})"


class Freeze(UnfreezeStrategy):
    """Train the task head only; the backbone stays frozen (and its BatchNorm in eval mode) throughout."""

    name = "freeze"

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        return 0


class NoFreeze(UnfreezeStrategy):
    """Fine-tune every group from the first step."""

    name = "no_freeze"

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        return num_groups


class FreezeUnfreeze(UnfreezeStrategy):
    """Train the head alone until ``unfreeze_at_epoch``, then every group."""

    name = "freeze_unfreeze"

    def __init__(self, unfreeze_at_epoch: int = 1):
        if unfreeze_at_epoch < 0:
            raise TLError("unfreeze_at_epoch must be >= 0; fix --model.unfreeze.unfreeze_at_epoch.")
        self.unfreeze_at_epoch = unfreeze_at_epoch

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        return num_groups if epoch >= self.unfreeze_at_epoch else 0


class Milestones(UnfreezeStrategy):
    """Head alone until ``milestones[0]``, then the top ``top_groups`` groups, then every group at ``milestones[1]``."""

    name = "milestones"

    def __init__(self, milestones: tuple[int, int] = (1, 2), top_groups: int = 2):
        milestones = tuple(int(m) for m in milestones)
        if len(milestones) != 2 or not 0 <= milestones[0] <= milestones[1]:
            raise TLError(f"milestones must be two epochs E1 <= E2, got {list(milestones)}; "
                          "fix --model.unfreeze.milestones.")
        if top_groups < 1:
            raise TLError("top_groups must be >= 1; fix --model.unfreeze.top_groups.")
        self.milestones = milestones
        self.top_groups = top_groups

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        first, second = self.milestones
        if epoch >= second:
            return num_groups
        return self.top_groups if epoch >= first else 0


class Gradual(UnfreezeStrategy):
    """Gradual unfreezing (ULMFiT, Howard & Ruder 2018): from ``start_epoch`` on, ``groups_per_epoch`` more
    groups train each epoch, top down, until all do."""

    name = "gradual"

    def __init__(self, start_epoch: int = 1, groups_per_epoch: int = 1):
        if start_epoch < 0 or groups_per_epoch < 1:
            raise TLError("gradual unfreezing needs start_epoch >= 0 and groups_per_epoch >= 1; fix --model.unfreeze.")
        self.start_epoch = start_epoch
        self.groups_per_epoch = groups_per_epoch

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        return 0 if epoch < self.start_epoch else (epoch - self.start_epoch + 1) * self.groups_per_epoch


class LPFT(UnfreezeStrategy):
    """LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features...", ICLR 2022): fit a linear probe
    on the frozen pretrained features first, then fine-tune every group starting from that head.

    The probe runs once before the first training step: features of the training split (deterministic
    transforms, backbone in eval mode) and ``probe_steps`` full-batch L-BFGS steps on the head's task loss plus
    ``probe_l2`` times the squared weights (L2-regularised logistic regression). A resumed run skips it (the
    probed head is in the checkpoint). Under DDP rank 0's head is broadcast so every rank starts the same.
    """

    name = "lp_ft"

    def __init__(self, probe_steps: int = 100, probe_l2: float = 1e-4):
        if probe_steps < 1 or probe_l2 < 0:
            raise TLError("lp_ft needs probe_steps >= 1 and probe_l2 >= 0; fix --model.unfreeze.")
        self.probe_steps = probe_steps
        self.probe_l2 = probe_l2

    def trainable_top(self, epoch: int, num_groups: int) -> int:
        return num_groups

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.current_epoch == 0 and trainer.global_step == 0:
            self.fit_probe(trainer, pl_module)
        super().on_train_epoch_start(trainer, pl_module)

    def _probe_loader(self, trainer: "L.Trainer"):
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "split_dataset") and hasattr(dm, "make_loader"):
            return dm.make_loader(dm.split_dataset("train", deterministic=True), shuffle=False)
        return trainer.train_dataloader

    def fit_probe(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        from tl_lightning.feature_cache import extract_features

        data = extract_features(pl_module.backbone, self._probe_loader(trainer), pl_module.device, desc="linear probe")
        x, y = data["features"].to(pl_module.device), data["targets"].to(pl_module.device)
        head = pl_module.head
        was_training = head.training
        head.train(False)  # no dropout noise in a full-batch fit
        weights = [p for n, p in head.named_parameters() if n.endswith("weight")]
        optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=self.probe_steps,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = pl_module.loss(head(x), y) + self.probe_l2 * sum((w ** 2).sum() for w in weights)
            loss.backward()
            return loss

        with torch.enable_grad():
            for p in head.parameters():
                p.requires_grad_(True)
            optimizer.step(closure)
        for p in head.parameters():
            p.grad = None
        head.train(was_training)
        if trainer.world_size > 1:
            state = trainer.strategy.broadcast({k: v.detach().cpu() for k, v in head.state_dict().items()}, src=0)
            head.load_state_dict(state)
        with torch.no_grad():
            accuracy = (head(x).argmax(-1) == y).float().mean().item() if y.ndim == 1 else None
        if accuracy is not None:
            pl_module.probe_train_acc = accuracy


#: names accepted by ``--model.unfreeze``
STRATEGIES = {cls.name: cls for cls in (Freeze, NoFreeze, FreezeUnfreeze, Milestones, Gradual, LPFT)}


def make_strategy(spec: Union[str, dict, UnfreezeStrategy, None]) -> UnfreezeStrategy:
    """A strategy from its name (``gradual``), a ``{class_path, init_args}`` dict, or an instance."""
    if spec is None:
        return NoFreeze()
    if isinstance(spec, UnfreezeStrategy):
        return spec
    if isinstance(spec, str):
        if spec not in STRATEGIES:
            raise TLError(f"unknown unfreeze strategy '{spec}'; choose one of {', '.join(STRATEGIES)}.")
        return STRATEGIES[spec]()
    if isinstance(spec, dict) and "class_path" in spec:
        return instantiate(spec, UnfreezeStrategy, "an unfreeze strategy",
                           f"use one of {', '.join(STRATEGIES)} or a subclass of UnfreezeStrategy.")
    raise TLError(f"cannot read unfreeze strategy {spec!r}; give a name ({', '.join(STRATEGIES)}) or a class_path.")
