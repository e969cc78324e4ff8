"""Atomic file writes: a temp file beside the target, flushed and fsynced, then renamed over it.

A write that fails (a full disk, a read-only folder) removes its temp file and leaves the previous file intact,
and says so in one sentence. ``AtomicCheckpointIO`` makes Lightning's checkpoints (``last.ckpt``, ``best-*.ckpt``,
``hpc_ckpt_*.ckpt``) go the same way instead of Lightning's in-place write.
"""
from __future__ import annotations

import errno
import io
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tl_lightning.errors import TLError


def write_error(err: OSError, path: str) -> TLError:
    """One sentence for a failed write of ``path``."""
    if err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        return TLError(f"no space left on device while writing {path}; free space or move "
                       "--trainer.default_root_dir to a larger disk (the previous file is intact).")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return TLError(f"cannot write {path} ({err.strerror}); make the folder writable or set "
                       "--trainer.default_root_dir to a writable folder.")
    return TLError(f"writing {path} failed ({err.strerror}); check the disk and --trainer.default_root_dir.")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs: Any) -> Iterator[io.IOBase]:
    """``open(path, mode)`` whose content replaces ``path`` only once it is completely on disk."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise write_error(e, path) from e
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(folder)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_open(path, "w", newline="") as f:
        f.write(text)
    return path


def save_figure(fig: Any, path: str, **kwargs: Any) -> None:
    """``fig.savefig(path)`` atomically (the format comes from the file name)."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def torch_save(obj: Any, path: str) -> None:
    buffer = io.BytesIO()  # serialised first: a failing disk then surfaces as an OSError of the write below
    torch.save(obj, buffer)
    with atomic_open(path, "wb") as f:
        f.write(buffer.getbuffer())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that writes each checkpoint atomically in its own folder."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        torch_save(checkpoint, os.fspath(path))
