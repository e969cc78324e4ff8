"""The task sequence of class-incremental learning as ordinary epochs: task ``t`` is epochs
``t * E .. (t + 1) * E - 1`` of one fit (``E`` = the model's ``epochs_per_task``).

Avalanche's split: the loop belongs to the Trainer, the state to the plugins. This callback owns the schedule
only. At a task's last epoch it triggers the model's end of task (memory update, evaluation, previous model:
``IncrementalLearner.finish_task``) and hands the next task and the model's exemplar positions to the
DataModule (``ClassIncrementalDataModule.set_task``), whose loaders are rebuilt every epoch
(``reload_dataloaders_every_n_epochs: 1``). At a task's first epoch it lets the model start the task
(``start_task``: a fresh optimizer state). After the last task it stops the fit (``trainer.should_stop``, as
``EarlyStopping`` does), so ``max_epochs`` may be left unset; a smaller ``max_epochs`` stops mid-sequence and
``--ckpt_path`` continues it.

Resume uses public state only: the model's checkpoint says how many tasks are finished, the Trainer's
``current_epoch`` (final once ``on_train_start`` runs) which task the next epoch belongs to. A task end that a
checkpoint did not include (a run stopped between the task's last validation and its end) runs in
``on_train_start``, before the first epoch's loader is rebuilt. A DataModule that serves another task than the
epoch's stops the run with one sentence instead of training on the wrong classes.

``ICaRL`` adds this callback itself (``configure_callbacks``).
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.errors import TLError


@runtime_checkable
class IncrementalLearner(Protocol):
    """What the schedule needs of the model (``ICaRL``)."""

    epochs_per_task: int
    finished: int  # tasks whose end is done
    task: int  # the task being trained (the last one once every task is finished)

    def finish_task(self, task: int) -> None: ...

    def start_task(self, task: int) -> None: ...

    def memory_positions(self): ...


@runtime_checkable
class TaskData(Protocol):
    """What the schedule needs of the DataModule (``ClassIncrementalDataModule``)."""

    num_tasks: int

    def set_task(self, task: int, memory_positions=None) -> None: ...


def sequence_epochs(model, datamodule) -> Optional[int]:
    """Epochs of a whole class-incremental task sequence (``epochs_per_task`` x the DataModule's tasks), or None
    for other methods: the CLI makes it the Trainer's ``max_epochs`` when the config leaves that unset, so the
    progress bar and the planned batches count the sequence rather than Lightning's default 1,000 epochs."""
    epochs, tasks = getattr(model, "epochs_per_task", None), getattr(datamodule, "num_tasks", None)
    return epochs * tasks if isinstance(epochs, int) and isinstance(tasks, int) else None


class TaskSchedule(Callback):
    """Class-incremental tasks as epochs of one fit (see module docstring)."""

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if not isinstance(pl_module, IncrementalLearner):
            raise TLError(f"TaskSchedule needs a class-incremental model such as ICaRL, not "
                          f"{pl_module.__class__.__name__}.")
        dm = trainer.datamodule
        if not isinstance(dm, TaskData):
            raise TLError("the task schedule needs a class-incremental DataModule; use data.class_path "
                          "tl_lightning.data.incremental.ClassIncrementalDataModule around your data set.")
        if stage == "fit" and trainer.reload_dataloaders_every_n_epochs != 1:
            raise TLError("class-incremental training switches tasks at epoch boundaries, so its loaders must be "
                          "rebuilt every epoch; set --trainer.reload_dataloaders_every_n_epochs=1.")

    @staticmethod
    def _epoch_task(trainer: "L.Trainer", pl_module: IncrementalLearner) -> int:
        return min(trainer.current_epoch // pl_module.epochs_per_task, trainer.datamodule.num_tasks)

    @staticmethod
    def _serve(trainer: "L.Trainer", pl_module: IncrementalLearner) -> None:
        trainer.datamodule.set_task(pl_module.task, pl_module.memory_positions())

    def _catch_up(self, trainer: "L.Trainer", pl_module: IncrementalLearner, target: int) -> None:
        """Finish every task before ``target`` that is not finished yet, then serve the current one."""
        while pl_module.finished < min(target, trainer.datamodule.num_tasks):
            pl_module.finish_task(pl_module.finished)
        self._serve(trainer, pl_module)

    def on_fit_start(self, trainer: "L.Trainer", pl_module: IncrementalLearner) -> None:
        self._serve(trainer, pl_module)  # before the first loader: the task the checkpoint was in

    def on_train_start(self, trainer: "L.Trainer", pl_module: IncrementalLearner) -> None:
        self._catch_up(trainer, pl_module, self._epoch_task(trainer, pl_module))
        if pl_module.finished >= trainer.datamodule.num_tasks:
            rank_zero_info("every task of the sequence is finished; nothing left to train.")
            trainer.should_stop = True

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: IncrementalLearner) -> None:
        task = self._epoch_task(trainer, pl_module)
        served = trainer.datamodule.task
        if task >= trainer.datamodule.num_tasks or served != task or pl_module.finished != task:
            raise TLError(f"epoch {trainer.current_epoch} belongs to task {task}, but the DataModule serves task "
                          f"{served} and {pl_module.finished} tasks are finished; resume from the run's last.ckpt "
                          "with the same epochs_per_task.")
        pl_module.start_task(task)

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: IncrementalLearner) -> None:
        if (trainer.current_epoch + 1) % pl_module.epochs_per_task:
            return
        self._catch_up(trainer, pl_module, (trainer.current_epoch + 1) // pl_module.epochs_per_task)
        if pl_module.finished >= trainer.datamodule.num_tasks:
            trainer.should_stop = True  # every task is done
