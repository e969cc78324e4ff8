"""Shared test setup: an isolated cache dir and offline W&B for every test (shared helpers: ``tests/helpers``)."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tl_cache")
    os.environ["TL_LIGHTNING_CACHE"] = str(cache)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
