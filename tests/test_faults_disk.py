"""Atomic writes (issue 15, item 5), on a real, small tmpfs that the test mounts: a write that hits a full disk
leaves the previous file intact, no temp file behind, and one sentence."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from fault_helpers import QUICK, cli, error_line
from helpers.tmpfs import mounted_tmpfs
from tl_lightning import atomic
from tl_lightning.errors import TLError


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs mounted at ``tmp_path/disk`` (skipped where mounting is not allowed)."""
    with mounted_tmpfs(tmp_path / "disk", "size=48m") as disk:
        yield disk


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill the disk until a write fails, then free ``leave_bytes``."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * (64 << 10))
    except OSError:
        pass
    finally:
        os.close(fd)
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave_bytes))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_disk_keeps_the_previous_file(small_disk):
    target = small_disk / "metrics.json"
    atomic.write_text(str(target), '{"old": 1}')
    fill(small_disk, leave_bytes=64 << 10)
    with pytest.raises(TLError, match=r"^no space left on device while writing .*metrics.json; free space"):
        atomic.write_text(str(target), "x" * (1 << 20))
    assert target.read_text() == '{"old": 1}'
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "metrics.json"]


@pytest.mark.slow
def test_checkpoint_on_a_full_disk_leaves_last_ckpt_intact(small_disk):
    run = small_disk / "run"
    first = cli("fit", *QUICK, "--trainer.max_epochs=1", "--test_after_fit=false", f"--trainer.default_root_dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    before = digest(last)
    assert last.stat().st_size > 128 << 10  # the head's weights and optimizer state: larger than the small files
    fill(small_disk, leave_bytes=last.stat().st_size // 2)  # room for small files, not for a checkpoint
    resumed = cli("fit", *QUICK, "--trainer.max_epochs=3", "--test_after_fit=false",
                  f"--trainer.default_root_dir={run}", f"--ckpt_path={last}")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    msg = error_line(resumed)
    assert msg.startswith("error: no space left on device while writing ") and "--trainer.default_root_dir" in msg
    assert digest(last) == before  # the previous last.ckpt, whole
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    leftovers = [p.name for p in run.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
