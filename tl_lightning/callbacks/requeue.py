"""SLURM auto-requeue that is safe under DDP and resumes from an epoch boundary.

Lightning's own handler saves the checkpoint and requeues *inside* the SIGUSR1 handler. Under DDP each rank runs
it wherever the signal lands; when one rank is inside a gradient all-reduce and the other enters the checkpoint's
barrier, both wait for ever. Here the signal only sets a flag; at the next batch boundary the ranks agree on it
(one scalar max-reduce) and stop together.

The checkpoint the requeued job restores (``hpc_ckpt_<n>.ckpt`` in the run directory, which Lightning's
checkpoint connector finds) is a copy of ``last.ckpt``: the end of the last finished epoch, with its validation,
history row and generator states. A mid-epoch state would resume with a different data order and, when saved
after an epoch's last batch, without that epoch's validation (see ``callbacks/interrupt.py``). The run then stops
by raising ``Requeued``, so no epoch-end hook records the cut-short epoch; the CLI exits 0 (SLURM runs the job
again). A job signalled before its first epoch ended has nothing to resume and starts again.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from typing import Optional

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info

from tl_lightning.atomic import atomic_open


class Requeued(Exception):
    """The job asked SLURM to requeue it; every rank stops here (not an error: the CLI exits 0)."""


def _hpc_numbers(run_dir: str) -> list[int]:
    names = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    return sorted(int(m.group(1)) for name in names if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", name)))


def newest_hpc_checkpoint(run_dir: str) -> Optional[str]:
    """The ``hpc_ckpt_<n>.ckpt`` with the highest ``n`` in ``run_dir`` (what Lightning restores under SLURM)."""
    numbers = _hpc_numbers(run_dir)
    return os.path.join(run_dir, f"hpc_ckpt_{numbers[-1]}.ckpt") if numbers else None


def next_hpc_checkpoint(run_dir: str) -> str:
    """``<run_dir>/hpc_ckpt_<n>.ckpt`` with ``n`` one above the highest there."""
    return os.path.join(run_dir, f"hpc_ckpt_{(_hpc_numbers(run_dir) or [0])[-1] + 1}.ckpt")


class SLURMRequeue(L.Callback):
    """Requeue a SLURM job on ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@90``) at a safe point of the training loop."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self.active = False
        self.received = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        # installed before the Trainer registers its handlers, so Lightning's in-handler requeue stays off
        signal.signal(self.signum, self._on_signal)
        self.active = True

    def _on_signal(self, signum, _frame) -> None:
        self.received = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if not self.active:
            return
        flag = torch.tensor(float(self.received), device=pl_module.device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        if flag.item() > 0:
            self._requeue(trainer)

    def _requeue(self, trainer: L.Trainer) -> None:
        self.active = False
        rank_zero_info(f"Handling auto-requeue signal: {self.signum}")
        if trainer.is_global_zero:
            resume = self._checkpoint_for_the_requeued_job(trainer)
            job_id = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.call(["scontrol", "requeue", job_id])
            rank_zero_info(f"requeue of SLURM job {job_id}: exit code {result}; the requeued job "
                           + (f"resumes from {resume}" if resume else "starts again (no epoch had finished)"))
        raise Requeued(f"stopped in epoch {trainer.current_epoch} at step {trainer.global_step} for a SLURM requeue")

    @staticmethod
    def _checkpoint_for_the_requeued_job(trainer: L.Trainer) -> Optional[str]:
        """Copy ``last.ckpt`` (the last epoch end) to the next ``hpc_ckpt_<n>.ckpt``, atomically; its path."""
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        last = os.path.join(folder, "last.ckpt") if folder else None
        if last is None or not os.path.isfile(last):
            return None
        target = next_hpc_checkpoint(trainer.default_root_dir)
        with open(last, "rb") as src, atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        return target
