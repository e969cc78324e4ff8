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
    # under ``pytest -n N`` the workers share the cores: each worker and the runs it starts get cores // N threads
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(2, (os.cpu_count() or 1) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    yield


def pytest_collection_modifyitems(items):
    """Long tests first, so that under ``pytest -n`` (``make test``) no worker starts one last while the others sit
    idle: a group that one worker runs in turn (the SLURM cluster's), then the tests marked ``slow``, then the rest;
    the order within each kind stays as collected (the same on every worker)."""
    items.sort(key=lambda item: (item.get_closest_marker("xdist_group") is None,
                                 item.get_closest_marker("slow") is None))
