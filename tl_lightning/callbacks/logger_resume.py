"""A resumed run keeps logging where it left off: the same W&B run, the same TensorBoard and CSV version folders.

``LoggerResume`` writes each logger's identity into every checkpoint (``checkpoint["tl_loggers"]``): the W&B run
id and the TensorBoard and CSV ``version``. Before a resumed ``fit`` builds its Trainer, the CLI reads them back
from the checkpoint it resumes from (``--ckpt_path``, or under SLURM the ``hpc_ckpt_<n>.ckpt`` a requeued job
restores) and configures the loggers with them: W&B gets ``id`` (``tl_lightning.loggers.WandbLogger`` always
passes ``resume="allow"``); TensorBoard and CSV get ``version`` and ``purge_step`` = the checkpoint's global
step, so the steps the stopped run logged after its checkpoint are dropped and every step appears once
(``tl_lightning.loggers.continuing``; Lightning's own two loggers are swapped for those, with the same
arguments). W&B cannot delete logged rows: there the redone steps appear twice (same ``trainer/global_step``).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.callbacks.requeue import newest_hpc_checkpoint

CHECKPOINT_KEY = "tl_loggers"
#: loggers whose identity is stored: checkpoint name -> (Logger class, the init argument that takes it)
KINDS = {"wandb": (WandbLogger, "id"), "tensorboard": (TensorBoardLogger, "version"), "csv": (CSVLogger, "version")}
#: Lightning's loggers that a resumed run swaps for the ones that continue a version folder (same arguments)
CONTINUING = {TensorBoardLogger: "tl_lightning.loggers.TensorBoardLogger", CSVLogger: "tl_lightning.loggers.CSVLogger"}


def logger_identities(loggers) -> dict[str, Any]:
    """``{"wandb": run id, "tensorboard": version}`` of the loggers that have one."""
    found: dict[str, Any] = {}
    for logger in loggers:
        for kind, (cls, _arg) in KINDS.items():
            if isinstance(logger, cls) and kind not in found:
                version = logger.version
                if version is not None and version != "":
                    found[kind] = version
    return found


class LoggerResume(L.Callback):
    """Stores the loggers' identities (W&B run id, TensorBoard and CSV versions) in every checkpoint, and releases
    the training rows a W&B logger holds back once their epoch has ended (``loggers.wandb_logger``)."""

    def __init__(self):
        self._epoch_start_step = 0

    @staticmethod
    def _holding_loggers(trainer: "L.Trainer") -> list:
        return [lg for lg in trainer.loggers if hasattr(lg, "hold") and hasattr(lg, "release")]

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._epoch_start_step = trainer.global_step
        for logger in self._holding_loggers(trainer):
            logger.hold()

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # the previous epoch ended and wrote last.ckpt: its rows (epoch-level ones are logged at its last step)
        self._epoch_start_step = trainer.global_step
        for logger in self._holding_loggers(trainer):
            logger.release(before_step=trainer.global_step)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        for logger in self._holding_loggers(trainer):
            logger.release(keep_holding=False)

    def on_exception(self, trainer: "L.Trainer", pl_module: "L.LightningModule", exception: BaseException) -> None:
        # stopped mid-epoch: the resumed run redoes the epoch from last.ckpt, so its rows are dropped here
        for logger in self._holding_loggers(trainer):
            logger.release(before_step=self._epoch_start_step, keep_holding=False)

    def on_save_checkpoint(self, trainer: "L.Trainer", pl_module: "L.LightningModule", checkpoint: dict) -> None:
        if trainer.is_global_zero:
            checkpoint[CHECKPOINT_KEY] = logger_identities(trainer.loggers)


def stored_identities(ckpt_path: str) -> tuple[dict[str, Any], Optional[int]]:
    """The identities a checkpoint holds (empty for checkpoints written without ``LoggerResume``) and its global
    step (the first step the resumed run logs)."""
    try:  # memory-mapped: only the small entries are read, not the weights
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError):  # an old (non-zip) serialisation cannot be memory-mapped
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        return {}, None
    value, step = checkpoint.get(CHECKPOINT_KEY), checkpoint.get("global_step")
    return (dict(value) if isinstance(value, dict) else {}), (int(step) if step is not None else None)


def resume_checkpoint(ckpt_path: Optional[str], run_dir: str) -> Optional[str]:
    """The checkpoint a ``fit`` will resume from: ``ckpt_path`` when it is a file, else under SLURM the run
    folder's newest HPC checkpoint (Lightning restores that one by itself)."""
    if ckpt_path:
        return str(ckpt_path) if os.path.isfile(str(ckpt_path)) else None
    if SLURMEnvironment.detect():
        return newest_hpc_checkpoint(run_dir)
    return None


def _class_of(class_path: Any):
    if not isinstance(class_path, str):
        return None
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def configure_resumed_loggers(trainer_config, identities: dict[str, Any],
                              purge_step: Optional[int] = None) -> list[str]:
    """Give the configured loggers the stored identities (only where the config leaves them unset) and, for
    TensorBoard and CSV, ``purge_step``; the default logger (``logger`` unset or true) becomes an explicit
    TensorBoard logger. Returns what was set, e.g. ``["wandb id abc123", "tensorboard version 0"]``."""
    from jsonargparse import Namespace

    loggers = trainer_config.get("logger")
    if loggers is False or not identities:
        return []
    if loggers in (None, True):
        if "tensorboard" not in identities:
            return []
        loggers = trainer_config["logger"] = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=str(trainer_config.get("default_root_dir"))))
    done = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        cls = _class_of(logger.get("class_path")) if hasattr(logger, "get") else None
        for kind, (base, arg) in KINDS.items():
            if cls is None or not issubclass(cls, base) or kind not in identities:
                continue
            if cls in CONTINUING:  # Lightning's own: the continuing one (a CSV one would delete metrics.csv)
                logger["class_path"], cls = CONTINUING[cls], _class_of(CONTINUING[cls])
            elif base is CSVLogger and not hasattr(cls, "purge_step"):
                continue  # another CSVLogger subclass: a new version folder keeps its earlier rows
            if logger.get("init_args") is None:
                logger["init_args"] = Namespace()
            if logger["init_args"].get(arg) in (None, ""):
                logger["init_args"][arg] = identities[kind]
                done.append(f"{kind} {arg} {identities[kind]}")
                if hasattr(cls, "purge_step") and purge_step is not None:
                    logger["init_args"]["purge_step"] = purge_step
    return done


def resume_loggers(trainer_config, ckpt_path: Optional[str]) -> list[str]:
    """Before a ``fit`` builds its Trainer: when it resumes, configure its loggers with the identities stored in
    the checkpoint it resumes from (see the module docstring); returns what was set."""
    ckpt = resume_checkpoint(ckpt_path, str(trainer_config.get("default_root_dir")))
    done = configure_resumed_loggers(trainer_config, *stored_identities(ckpt)) if ckpt else []
    if done:
        rank_zero_info(f"resuming from {ckpt}: logging continues with " + ", ".join(done))
    return done
