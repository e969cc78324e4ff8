"""Multi-process DDP through the CLI (2 CPU processes, gloo): results match one process within noise, metrics
are synced across ranks, and only rank 0 writes files and logs. Each method gets a 2-process smoke run."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from fault_helpers import cli
from helpers import read_metrics

pytestmark = pytest.mark.slow

QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.num_workers=0")


def fit(run_dir: Path, *args: str, timeout: int = 600, command: str = "fit") -> subprocess.CompletedProcess:
    """``python -m tl_lightning <command>``: a fresh process for DDP (which relaunches this command line for rank 1),
    a forked one (``helpers.launch``) for the one-process references."""
    proc = cli(command, *args, *QUIET, f"--trainer.default_root_dir={run_dir}", timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def ddp(*args: str) -> tuple[str, ...]:
    return ("--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", *args)


def assert_two_ranks_one_writer(proc: subprocess.CompletedProcess, run_dir: Path) -> dict:
    out = proc.stdout + proc.stderr
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert out.count("Results (fit)") == 1  # the results table: rank 0 only
    metrics = read_metrics(run_dir)
    assert not list(run_dir.rglob("*.tmp"))  # no half-written files from a second writer
    return metrics


def test_feature_extraction_ddp_matches_one_process(tmp_path):
    """Quickstart digits at 32 px: 2 processes x batch 32 against 1 process x batch 64 (the same steps)."""
    common = ("--config", "configs/quickstart.yaml", "--data.image_size=32", "--trainer.max_epochs=6")
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    fit(single_dir, *common, "--trainer.logger=false")
    proc = fit(ddp_dir, *common, "--config", "configs/logger/wandb.yaml", *ddp("--data.batch_size=32"))
    one, two = read_metrics(single_dir), assert_two_ranks_one_writer(proc, ddp_dir)

    # the same split sizes, trained for the same number of optimizer steps per epoch
    assert two["epochs"] == one["epochs"] == 6
    assert two["metrics"]["test/acc"] == pytest.approx(one["metrics"]["test/acc"], abs=0.06)
    assert two["metrics"]["val/acc"] == pytest.approx(one["metrics"]["val/acc"], abs=0.08)
    assert two["metrics"]["test/acc"] > 0.5

    # metrics are synced: the confusion matrix (summed over ranks) covers the whole test split, and its
    # accuracy is the logged test/acc (torchmetrics, synced across ranks)
    confusion = json.loads((ddp_dir / "confusion_matrix.json").read_text())["matrix"]
    single_confusion = json.loads((single_dir / "confusion_matrix.json").read_text())["matrix"]
    n_test, n_ddp = sum(map(sum, single_confusion)), sum(map(sum, confusion))
    assert n_test == 359 and n_ddp == 2 * math.ceil(n_test / 2)  # both halves (DistributedSampler pads one)
    assert sum(confusion[i][i] for i in range(10)) / n_ddp == pytest.approx(two["metrics"]["test/acc"], abs=1e-6)

    # only rank 0 logs: one W&B run
    assert len(list((ddp_dir / "wandb").glob("offline-run-*"))) == 1


def test_ddp_predict_writes_one_merged_csv(tmp_path):
    """2-process predict: rank 0 writes every rank's rows once (no per-rank files, no padding duplicates), and
    they equal a 1-process predict from the same checkpoint."""
    common = ("--config", "configs/quickstart.yaml", "--data.image_size=32", "--trainer.logger=false")
    fit(tmp_path / "fit", *common, "--trainer.max_epochs=2", "--test_after_fit=false")
    ckpt = read_metrics(tmp_path / "fit")["best_checkpoint"]
    fit(tmp_path / "one", *common, f"--ckpt_path={ckpt}", command="predict")
    fit(tmp_path / "two", *common, f"--ckpt_path={ckpt}", *ddp(), command="predict")
    one = (tmp_path / "one" / "predictions.csv").read_text().splitlines()
    two = (tmp_path / "two" / "predictions.csv").read_text().splitlines()
    assert [p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("predictions")] == ["predictions.csv"]
    assert len(one) == 1 + 359 and len({row.split(",")[0] for row in two[1:]}) == 359  # the test split, once
    assert two[0] == one[0] and same_predictions(one, two)


def same_predictions(one: list[str], two: list[str]) -> bool:
    """Same file -> class everywhere and scores within 1e-4 (batching differs between 1 and 2 processes)."""
    a = {r.split(",")[0]: r.split(",")[1:] for r in one[1:]}
    b = {r.split(",")[0]: r.split(",")[1:] for r in two[1:]}
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and abs(float(a[k][1]) - float(b[k][1])) < 1e-4
                                        for k in a)


# FineTune under DDP (frozen stages, the unfreeze, rank 0's broadcast head) has its own test:
# tests/test_finetune.py::test_ddp_two_cpu_processes_freeze_unfreeze
METHOD_RUNS = {
    "DomainAdaptation": ("tl_lightning/methods/adaptation.py", "configs/adaptation/digits_offline.yaml",
                         # the source stage (epoch 0, the network on the source alone), soft labels from it on
                         # every rank, then the adaptation steps (paired loaders, two optimizers)
                         ("--trainer.max_epochs=2", "--model.source_pretrain_epochs=1")),
    "ICaRL": ("tl_lightning/methods/incremental.py", "configs/incremental/digits_offline.yaml",
              ("--model.epochs_per_task=1",)),
}


@pytest.mark.parametrize("method", sorted(METHOD_RUNS))
def test_method_runs_with_two_processes(method, tmp_path):
    _module, config, extra = METHOD_RUNS[method]
    run_dir = tmp_path / method
    proc = fit(run_dir, "--config", config, *extra, "--trainer.logger=false", *ddp())
    metrics = assert_two_ranks_one_writer(proc, run_dir)
    assert any(k.startswith("test/") for k in metrics["metrics"])
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    if method == "ICaRL":  # every task ran, and the exemplar memory holds exactly its budget (K = 200)
        assert metrics["incremental"]["tasks_finished"] == 5 and metrics["incremental"]["exemplars"] == 200
