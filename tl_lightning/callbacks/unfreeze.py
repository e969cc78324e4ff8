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
from typing import Protocol, Union, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import nn

from tl_lightning.errors import TLError
from tl_lightning.instantiate import instantiate


@runtime_checkable
class StagedModel(Protocol):
    """What a strategy needs of the model (``FineTune``): its backbone's layer groups, input to output, a way to
    choose the ones that train, and (``lp_ft``) a linear probe of the head on the frozen features."""

    backbone: nn.Module
    head: nn.Module
    backbone_group_names: list[str]

    def set_trainable_groups(self, backbone_groups: list[str]) -> None: ...

    def fit_linear_probe(self, steps: int, l2: float) -> None: ...


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
        if not isinstance(pl_module, StagedModel):
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
            pl_module.fit_linear_probe(self.probe_steps, self.probe_l2)  # the model owns its head's fit
        super().on_train_epoch_start(trainer, pl_module)



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
