"""Extract backbone features once and keep them on disk, keyed by everything that determines them.

The key covers the backbone name, its weights, the read-out layers, the input transform and the data set's
samples (see ``SampleSet.fingerprint``: paths with each file's size and ``mtime_ns``, crop boxes, the whole array
of in-memory sources) and ``FORMAT_VERSION``, so a second run with another head or learning rate reuses the file,
and any change to what produces the features makes a new one. Files are written atomically and carry a SHA-256 of
their payload: an entry that fails it (a bit flip, a truncated file) is removed with one warning and re-extracted.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import warnings
import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tl_lightning.atomic import atomic_open
from tl_lightning.errors import TLError
from tl_lightning.rng import generators_kept


#: bumped whenever what a cache entry holds, or how its key is made, changes: older entries are never read
FORMAT_VERSION = 2
_MAGIC = b"tl-features"


def cache_key(**parts) -> str:
    parts = dict(parts, cache_format=FORMAT_VERSION)
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _pack(value: dict) -> bytes:
    """``<magic> <format> <sha256 of the payload>\n<torch.save payload>``."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    header = b"%s %d %s\n" % (_MAGIC, FORMAT_VERSION, hashlib.sha256(payload).hexdigest().encode())
    return header + payload


def _unpack(blob: bytes) -> Optional[dict]:
    """The entry's tensors, or None when the header or the checksum does not match."""
    header, _, payload = blob.partition(b"\n")
    parts = header.split(b" ")
    if len(parts) != 3 or parts[0] != _MAGIC or parts[1] != str(FORMAT_VERSION).encode():
        return None
    if hashlib.sha256(payload).hexdigest().encode() != parts[2]:
        return None
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception:
        return None


class _Entry(dict):
    """A cache entry's tensors, in a dict that can be weakly referenced (``FeatureCache._memo``)."""


class FeatureCache:
    """Tensors on disk under ``<cache_dir>/features/<key>.pt``, plus an in-process memo by file path that holds an
    entry only while something else uses it: a run that averages views or keeps only the chosen read-out does not
    keep every extracted matrix alive (on full CUB with ``auto`` and two views, 2.1 GB of views)."""

    _memo: "weakref.WeakValueDictionary[str, _Entry]" = weakref.WeakValueDictionary()

    def __init__(self, cache_dir: str, enabled: bool = True):
        self.root = os.path.join(cache_dir, "features")
        self.enabled = enabled

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.pt")

    def load(self, key: str) -> Optional[dict]:
        if not self.enabled:
            return None
        path = self.path(key)
        if path in self._memo:
            return self._memo[path]
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        value = _unpack(blob)
        if value is None:  # a bit flip, a truncated file, an older format: drop it and extract again
            warnings.warn(f"feature cache entry '{path}' failed its checksum; it is removed and the features are "
                          "extracted again.", stacklevel=2)
            try:
                os.remove(path)
            except OSError:
                pass
            return None
        entry = self._memo[path] = _Entry(value)
        return entry

    def save(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        path = self.path(key)
        try:
            with atomic_open(path, "wb") as f:
                f.write(_pack(value))
        except TLError as e:
            cause = e.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                raise TLError(
                    f"no space left on device while writing the feature cache to '{self.root}'; free space "
                    "or point --model.cache_dir (or $TL_LIGHTNING_CACHE) at a larger disk."
                ) from cause
            raise TLError(f"cannot write the feature cache to '{self.root}' ({getattr(cause, 'strerror', e)}); "
                          "set --model.cache_dir.") from cause

    def get_or_compute(self, key: str, compute: Callable[[], dict]) -> dict:
        """The cached entry, or ``compute()`` stored. The random generators end where they started either way
        (a loader draws seeds), so a run that extracts draws the same later numbers as one that hit the cache."""
        value = self.load(key)
        if value is None:
            with generators_kept():
                value = compute()
            self.save(key, value)
        return value


@torch.no_grad()
def extract_features(extractor: nn.Module, loader: DataLoader, device: torch.device, desc: str = "features",
                     channels_last: Optional[bool] = None) -> dict:
    """Run ``extractor`` over ``loader`` in eval mode: {'features': [N, D] float32, 'targets': [N, ...]}, or with an
    extractor that returns ``{name: [B, D]}`` (``ReadoutSet``), ``features`` is ``{name: [N, D]}``. The images are
    given the extractor's memory layout (``channels_last``; default: NHWC when its conv weights are)."""
    if channels_last is None:
        kernels = [p for p in extractor.parameters() if p.ndim == 4]
        channels_last = bool(kernels) and kernels[0].is_contiguous(memory_format=torch.channels_last) \
            and not kernels[0].is_contiguous()
    was_training = extractor.training
    extractor.eval()
    feats, targets = [], []
    # one iterator: tqdm.auto's tqdm calls iter() on what it wraps and iterates it again, which with loader
    # workers started them twice and threw away the batches they had decoded ahead
    for x, y in tqdm(iter(loader), total=len(loader), desc=desc, leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = extractor(x)
        feats.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
        targets.append(y)
    extractor.train(was_training)
    if feats and isinstance(feats[0], dict):
        return {"features": {k: torch.cat([f[k] for f in feats]) for k in feats[0]}, "targets": torch.cat(targets)}
    return {"features": torch.cat(feats), "targets": torch.cat(targets)}
