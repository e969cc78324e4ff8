"""SLURM: the rendered sbatch script, and a real one-node cluster (slurm/local_cluster.sh) that runs a 2-task CPU
DDP job, which is sent SIGUSR1 mid-training, saves an hpc checkpoint, requeues itself and resumes from it."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fault_helpers import cli
from helpers import REPO, read_metrics
from tl_lightning import slurm
from tl_lightning.errors import TLError

# one worker at a time on the local cluster under ``pytest -n`` (its two nodes, its daemons)
pytestmark = pytest.mark.xdist_group("slurm_cluster")

CLUSTER = REPO / "slurm" / "local_cluster.sh"


def render(capsys, *args: str) -> str:
    slurm.main(["--config", "configs/quickstart.yaml", *args, "--dry-run"])
    return capsys.readouterr().out


def test_dry_run_renders_every_option(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    script = render(capsys, "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8", "--partition", "gpu",
                    "--time", "04:00:00", "--job-name", "lite0", "--model.lr=0.01")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --time=04:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=SIGUSR1@90", "#SBATCH --job-name=lite0", "#SBATCH --requeue"):
        assert line in script.splitlines()
    command = script[script.index("srun "):]
    assert re.search(r"srun \S*python\S* -m tl_lightning fit --config \S+/configs/quickstart\.yaml", command)
    for flag in ("--trainer.accelerator=gpu", "--trainer.strategy=ddp", "--trainer.num_nodes=2",
                 "--trainer.devices=4", "--model.lr=0.01"):
        assert flag in command
    # the run directory is named after the job id, which a requeued job keeps
    assert 'RUN_DIR=' in script and "slurm-${SLURM_JOB_ID}" in script
    assert '--trainer.default_root_dir="${RUN_DIR}"' in command


def test_cpu_job_leaves_out_gpus_and_the_default_partition(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    script = render(capsys, "--devices", "2", "--cpus-per-task", "1")
    assert "--gpus-per-node" not in script and "--partition" not in script
    assert "#SBATCH --ntasks-per-node=2" in script and "--trainer.accelerator=cpu" in script


def test_bad_submit_arguments_are_one_sentence(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(TLError, match="config file 'nope.yaml' does not exist"):
        slurm.main(["--config", "nope.yaml", "--dry-run"])
    with pytest.raises(TLError, match="--devices 2 differs from --gpus-per-node 4"):
        slurm.main(["--config", "configs/quickstart.yaml", "--gpus-per-node", "4", "--devices", "2", "--dry-run"])


# ----- a real cluster ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run(["bash", str(CLUSTER)], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"no local SLURM cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for(condition, timeout: float, what: str, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    tail = log.read_text()[-3000:] if log.exists() else "(no log)"
    raise AssertionError(f"timed out waiting for {what}; job log:\n{tail}")


def requeue_and_wait(job_id: str, log: Path) -> None:
    """SIGUSR1 to the job's tasks (SLURM's warning before the time limit), then wait for its requeue and its end."""
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    wait_for(lambda: job_field(job_id, "Restarts") == "1", 900, "the requeue", log)
    wait_for(lambda: job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", ""),
             900, "the requeued job to finish", log)


@pytest.mark.slow
def test_submit_trains_requeues_and_resumes(cluster, tmp_path):
    """SIGUSR1 (SLURM's warning before the time limit) requeues the job, which resumes from its HPC checkpoint.

    Deterministic: ``HoldUntilSignal`` (tests/helpers/hold.py) holds both ranks inside epoch 1 until the signal
    has reached them, so the job can neither finish before the signal nor get it before its first checkpoint."""
    root, markers = tmp_path / "runs", tmp_path / "markers"
    epochs = 4
    proc = cli(  # submit itself runs forked (helpers.launch); the job's tasks start python -m tl_lightning
        "submit", "--config", "configs/quickstart.yaml", "--devices", "2", "--cpus-per-task", "1", "--time", "00:30:00",
        "--job-name", "tl-test-requeue", "--run-root", str(root), "--data.image_size=32", "--model.embedding=pooled",
        f"--trainer.max_epochs={epochs}", "--data.num_workers=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.logger=false",
        "--trainer.callbacks+=tests.helpers.hold.HoldUntilSignal", f"--trainer.callbacks.marker_dir={markers}",
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job_id = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    run_dir, log = root / f"slurm-{job_id}", root / f"slurm-{job_id}.out"
    assert f"run directory: {run_dir}" in proc.stdout
    try:
        # both ranks wait inside epoch 1 (epoch 0 checkpointed) -> SIGUSR1, as SLURM sends it before the time limit
        holding = [markers / "holding-rank0", markers / "holding-rank1"]
        wait_for(lambda: all(m.exists() for m in holding), 900, "both ranks to hold in epoch 1", log)
        assert job_field(job_id, "JobState") == "RUNNING"
        assert (run_dir / "checkpoints" / "last.ckpt").exists()
        requeue_and_wait(job_id, log)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    text = log.read_text()
    assert job_field(job_id, "JobState") in ("COMPLETED", ""), text[-3000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert "Handling auto-requeue signal" in text and hpc.exists()
    assert f"job {job_id} (restart 1)" in text
    assert f"Restored all states from the checkpoint at {hpc}" in text  # resumed, not restarted

    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 0  # last.ckpt of the last finished epoch (the hold is in epoch 1)
    metrics = read_metrics(run_dir)
    assert metrics["epochs"] == epochs and "test/acc" in metrics["metrics"]
    assert [row["epoch"] for row in metrics["history"]] == list(range(epochs))
    # the epochs before the interruption come from the checkpoint, not from a second training
    before = next(v for k, v in saved["callbacks"].items() if k.startswith("ResultsWriter"))["history"]
    assert [row["epoch"] for row in before] == [0]  # an epoch end with its row, not a cut-short epoch
    assert metrics["history"][:len(before)] == before
    assert json.loads((run_dir / "confusion_matrix.json").read_text())["matrix"]
