"""Shared test setup: an isolated cache dir, offline W&B, and a helper that runs the CLI in-process."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tl_cache")
    os.environ["TL_LIGHTNING_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def run_cli(*args: str) -> None:
    """Run ``python -m tl_lightning ARGS`` in this process (raises SystemExit on CLI errors)."""
    from tl_lightning.cli import main

    main([str(a) for a in args])


def read_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


# Fast trainer flags for CLI smoke tests: tiny images, no progress bars, CPU.
FAST = (
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false", "--trainer.logger=false", "--data.num_workers=0",
)


