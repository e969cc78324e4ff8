"""SVHN -> MNIST through the shipped config, end to end, on files in SVHN's and MNIST's official formats (real
SVHN is not reachable here)."""
from __future__ import annotations

import json
import math

import torch
from fixtures.datasets import write_mnist, write_svhn

from helpers import FAST, run_cli


def test_svhn_to_mnist_config_fits_and_tests_on_official_format_files(tmp_path):
    svhn = write_svhn(tmp_path / "svhn", n_train=60, n_test=20)
    mnist = write_mnist(tmp_path / "data", n_train=120, n_test=20)
    run_dir = tmp_path / "run"
    run_cli("fit", "--config", "configs/adaptation/svhn_to_mnist.yaml", *FAST,
            f"--data.init_args.source.init_args.data_dir={svhn}", f"--data.init_args.target.init_args.data_dir={mnist}",
            "--data.init_args.labelled_per_class=2", "--data.init_args.num_workers=0",
            "--model.init_args.source_pretrain_epochs=1", "--trainer.max_epochs=2",
            f"--trainer.default_root_dir={run_dir}")
    m = json.loads((run_dir / "metrics.json").read_text())
    sizes = m["data_sizes"]
    assert sizes["target_labelled"] == 20 and sizes["source_test"] == 20 and sizes["target_test"] == 20
    for key in ("test/target_acc", "test/source_acc", "val/target_acc", "train/loss_conf", "train/loss_soft"):
        assert math.isfinite(m["metrics"][key]), key
    assert len(m["source_pretrain_loss"]) == 1 and len(m["soft_labels"]) == 10
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # per-domain BatchNorm: the MNIST statistics moved away from SVHN's
    assert not torch.allclose(state["features.conv1.1.running_mean"], state["features.conv1.1.target_running_mean"])
