"""``RecordRanks``: each process of a run writes where it ran and what it resumed from, for tests of launchers.

At the start of training (after the cluster environment set the ranks and any checkpoint was restored) every
rank writes ``<out_dir>/rank<R>-restart<K>.json`` (``K`` = ``SLURM_RESTART_COUNT``, 0 outside a requeue) with
its global, node and local rank, the world size, the node count, the cluster environment, the SLURM node
name and ids, the checkpoint it was restored from and the epoch and global step it starts at. Written atomically
(temporary file, fsync, rename). Add it from the command line:
``--trainer.callbacks+=tests.helpers.ranks.RecordRanks --trainer.callbacks.out_dir=DIR``.
"""
from __future__ import annotations

import json
import os

import lightning as L


class RecordRanks(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        record = {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "cluster_environment": type(environment).__name__,
            "slurmd_nodename": os.environ.get("SLURMD_NODENAME"),
            "slurm_nodeid": os.environ.get("SLURM_NODEID"),
            "slurm_procid": os.environ.get("SLURM_PROCID"),
            "master_addr": os.environ.get("MASTER_ADDR"),
            "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "pid": os.getpid(),
        }
        os.makedirs(self.out_dir, exist_ok=True)
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        path = os.path.join(self.out_dir, f"rank{trainer.global_rank}-restart{restart}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
