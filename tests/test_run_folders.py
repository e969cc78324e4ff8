"""Run folders (issue 15, item 3): a rerun never overwrites an earlier run; ``--ckpt_path last`` resumes the newest."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers import FAST, REPO, read_metrics, run_cli
from tl_lightning import run_folders


def experiment(tmp_path: Path) -> tuple[Path, list[str]]:
    """An experiment folder set by a config file (as every shipped config does) and fast quickstart flags."""
    root = tmp_path / "exp"
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"trainer:\n  default_root_dir: {root}\n")
    args = ["--config", str(REPO / "configs/quickstart.yaml"), "--config", str(overlay), "--data.image_size=32",
            "--model.embedding=pooled", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2", *FAST]
    return root, args


def test_reruns_get_their_own_folder_and_last_resumes_the_newest(tmp_path):
    root, args = experiment(tmp_path)
    run_cli("fit", *args, "--trainer.max_epochs=1")
    first = Path(os.path.realpath(root / "latest"))
    first_metrics = (first / "metrics.json").read_bytes()
    run_cli("fit", *args, "--trainer.max_epochs=1")
    second = Path(os.path.realpath(root / "latest"))
    assert second != first and second.parent == first.parent == root.resolve()
    assert (first / "metrics.json").read_bytes() == first_metrics  # the earlier run is untouched
    assert sorted(p.name for p in (second / "checkpoints").iterdir() if p.name.startswith("last")) == ["last.ckpt"]

    # --ckpt_path last: the newest run's last.ckpt, resumed in that run's own folder (no third folder)
    run_cli("fit", *args, "--trainer.max_epochs=2", "--ckpt_path=last", "--test_after_fit=false")
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name, "latest"])
    resumed = read_metrics(second)
    assert [row["epoch"] for row in resumed["history"]] == [0, 1]
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert (first / "metrics.json").read_bytes() == first_metrics

    # test/validate/predict get their own <time>-<command> folder and leave `latest` on the newest fit
    run_cli("test", *args, "--ckpt_path=last")
    tests = [p for p in root.iterdir() if p.name.endswith("-test")]
    assert len(tests) == 1 and json.loads((tests[0] / "metrics.json").read_text())["command"] == "test"
    assert Path(os.path.realpath(root / "latest")) == second


def test_last_without_any_run_is_one_sentence(tmp_path, capsys):
    root, args = experiment(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli("fit", *args, "--ckpt_path=last")
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0
    assert "--ckpt_path last found no checkpoints/last.ckpt" in err
    assert not root.exists() or not any(root.iterdir())


def test_run_folder_names_and_lookup(tmp_path):
    root = tmp_path / "exp"
    a = run_folders.new_run_folder(str(root), "fit")
    b = run_folders.new_run_folder(str(root), "fit")  # same second: a suffix, never the same folder
    t = run_folders.new_run_folder(str(root), "test")
    assert len({a, b, t}) == 3 and os.readlink(root / "latest") == os.path.basename(b)
    assert run_folders.find_last_checkpoint(str(root)) is None
    os.makedirs(os.path.join(a, "checkpoints"))
    Path(a, "checkpoints", "last.ckpt").write_bytes(b"x")
    assert run_folders.find_last_checkpoint(str(root)) == os.path.join(a, "checkpoints", "last.ckpt")
    assert run_folders.run_folder_of(os.path.join(root, "latest", "x.ckpt"), str(root)) == os.path.join(
        str(root), os.path.basename(b))
    assert run_folders.run_folder_of(str(tmp_path / "elsewhere.ckpt"), str(root)) is None
    run_folders.discard_unused_run_folders()  # b and t hold no checkpoint: removed, latest back on a
    assert sorted(os.listdir(root)) == sorted([os.path.basename(a), "latest"])
    assert os.readlink(root / "latest") == os.path.basename(a)


@pytest.mark.slow
def test_ddp_processes_share_the_run_folder_rank_zero_created(tmp_path):
    """Lightning starts rank 1 by rerunning the command line: it must write into rank 0's run folder."""
    from fault_helpers import cli, experiment_overlay

    root = tmp_path / "exp"
    proc = cli("fit", "--config", REPO / "configs/quickstart.yaml", "--config", experiment_overlay(tmp_path, root),
               "--data.image_size=32", "--model.embedding=pooled", "--trainer.max_epochs=1",
               "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2", "--test_after_fit=false",
               "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", "--data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in root.iterdir() if p.name != "latest"]
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists() and (runs[0] / "checkpoints" / "last.ckpt").exists()


def test_run_name_names_the_experiment_and_the_version():
    """W&B shows a versioned run as ``<experiment>/<time>``; a typed run folder (SLURM, sweeps) by its own name."""
    from tl_lightning.run_folders import run_name

    assert run_name("runs/quickstart", "runs/quickstart/20261130-101010") == "quickstart/20261130-101010"
    assert run_name("runs/quickstart/", "runs/quickstart/20261130-101010-test") == "quickstart/20261130-101010-test"
    assert run_name("/tmp/r/slurm-7", "/tmp/r/slurm-7") == "slurm-7"
