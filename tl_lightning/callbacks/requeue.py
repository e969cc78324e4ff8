"""SLURM auto-requeue that is safe under DDP.

Lightning's own handler saves the checkpoint and requeues *inside* the SIGUSR1 handler. Under DDP each rank runs
it wherever the signal lands; when one rank is inside a gradient all-reduce and the other enters the checkpoint's
barrier, both wait for ever. Here the signal only sets a flag; at the next batch boundary the ranks agree on it
(one scalar max-reduce), save the HPC checkpoint together, and rank 0 calls ``scontrol requeue``. The requeued
job restores ``hpc_ckpt_*.ckpt`` from the same run directory (Lightning's checkpoint connector).
"""
from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment


class SLURMRequeue(L.Callback):
    """Requeue a SLURM job on ``SIGUSR1`` (``#SBATCH --signal=SIGUSR1@90``) at a safe point of the training loop."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self.active = False
        self.received = False
        #: True once this run saved its HPC checkpoint and asked SLURM to requeue it (the CLI then skips testing)
        self.requeued = False

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
        self.requeued = True
        L.pytorch.utilities.rank_zero_info(f"Handling auto-requeue signal: {self.signum}")
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # every rank together
        if trainer.is_global_zero:
            job_id = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.call(["scontrol", "requeue", job_id])
            L.pytorch.utilities.rank_zero_info(f"requeue of SLURM job {job_id}: exit code {result}")
        trainer.should_stop = True
