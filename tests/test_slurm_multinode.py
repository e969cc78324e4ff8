"""A real two-node SLURM cluster (``slurm/local_cluster.sh --nodes 2``: two slurmd daemons, n1 and n2, on this
host) runs ``submit --nodes 2 --devices 1``: one DDP process per node, world size 2. SIGUSR1 mid-training makes
the job save an HPC checkpoint and requeue itself; both nodes then resume from that same checkpoint."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from fault_helpers import cli
from helpers import read_metrics
from test_slurm import CLUSTER, job_field, requeue_and_wait, wait_for

# one worker at a time on the local cluster under ``pytest -n`` (its two nodes, its daemons)
pytestmark = pytest.mark.xdist_group("slurm_cluster")

NODES = ("n1", "n2")


@pytest.fixture(scope="module")
def two_node_cluster():
    proc = subprocess.run(["bash", str(CLUSTER), "--nodes", "2"], capture_output=True, text=True, timeout=2400)
    if proc.returncode == 3:
        pytest.skip(f"no local SLURM cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def rank_records(folder: Path, restart: int) -> list[dict]:
    return [json.loads((folder / f"rank{r}-restart{restart}.json").read_text()) for r in (0, 1)]


def assert_one_process_per_node(records: list[dict]) -> None:
    """Lightning's view (ranks, world size) matches SLURM's placement: rank r on node r, n1 and n2."""
    for rank, rec in enumerate(records):
        assert rec["cluster_environment"] == "SLURMEnvironment"
        assert (rec["global_rank"], rec["node_rank"], rec["local_rank"]) == (rank, rank, 0)
        assert (rec["world_size"], rec["num_nodes"]) == (2, 2)
        assert (rec["slurm_procid"], rec["slurm_nodeid"], rec["slurmd_nodename"]) == (str(rank), str(rank),
                                                                                        NODES[rank])
        assert rec["master_addr"] == NODES[0]  # the first node of SLURM_NODELIST, resolved on both nodes
    assert records[0]["pid"] != records[1]["pid"]


@pytest.mark.slow
def test_two_node_ddp_trains_requeues_and_both_nodes_resume(two_node_cluster, tmp_path):
    """Deterministic: ``HoldUntilSignal`` holds both ranks inside epoch 1 until SIGUSR1 has reached them."""
    root, markers, ranks = tmp_path / "runs", tmp_path / "markers", tmp_path / "ranks"
    epochs = 3
    proc = cli(  # submit itself runs forked (helpers.launch); the job's tasks start python -m tl_lightning
        *["submit", "--config", "configs/finetune/quickstart.yaml",
         "--nodes", "2", "--devices", "1", "--cpus-per-task", "1", "--time", "00:30:00",
         "--job-name", "tl-test-2nodes", "--run-root", str(root),
         "--data.image_size=32", f"--trainer.max_epochs={epochs}", f"--model.scheduler.init_args.T_max={epochs}",
         "--data.num_workers=0", "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
         "--trainer.callbacks+=tests.helpers.hold.HoldUntilSignal", f"--trainer.callbacks.marker_dir={markers}",
         "--trainer.callbacks+=tests.helpers.ranks.RecordRanks", f"--trainer.callbacks.out_dir={ranks}"],
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    run_dir, log = root / f"slurm-{job_id}", root / f"slurm-{job_id}.out"
    try:
        holding = [markers / "holding-rank0", markers / "holding-rank1"]
        wait_for(lambda: all(m.exists() for m in holding), 900, "both ranks to hold in epoch 1", log)
        assert job_field(job_id, "JobState") == "RUNNING"
        assert job_field(job_id, "NodeList") == "n[1-2]" and job_field(job_id, "NumNodes") == "2"
        assert (run_dir / "checkpoints" / "last.ckpt").exists()
        first = rank_records(ranks, 0)
        assert_one_process_per_node(first)
        assert first[0]["ckpt_path"] is None and first[1]["ckpt_path"] is None  # a fresh start
        requeue_and_wait(job_id, log)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text()
    assert job_field(job_id, "JobState") in ("COMPLETED", ""), text[-3000:]
    # Lightning's rendezvous, once per segment: two members across the two nodes
    for rank in (0, 1):
        assert text.count(f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2") == 2, text[-3000:]

    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert "Handling auto-requeue signal" in text and hpc.exists()
    assert f"job {job_id} (restart 1)" in text
    assert text.count("nodes: n[1-2] (2), tasks per node: 1") == 2  # the job script's view, each segment
    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0  # last.ckpt of the last finished epoch (the hold is in epoch 1)
    # after the requeue both nodes start again, each restored from the same checkpoint at the same step: the
    # epoch after the saved one (an epoch-end checkpoint)
    resumed = rank_records(ranks, 1)
    assert_one_process_per_node(resumed)
    for rec in resumed:
        assert rec["ckpt_path"] == str(hpc)
        assert (rec["epoch"], rec["global_step"]) == (saved["epoch"] + 1, saved["global_step"])
    assert saved["global_step"] > 0

    metrics = read_metrics(run_dir)
    assert metrics["epochs"] == epochs and "test/acc" in metrics["metrics"]
    assert [row["epoch"] for row in metrics["history"]] == list(range(epochs))
    before = next(v for k, v in saved["callbacks"].items() if k.startswith("ResultsWriter"))["history"]
    assert [row["epoch"] for row in before] == [0]  # an epoch end with its row, not a cut-short epoch
    assert metrics["history"][:len(before)] == before
