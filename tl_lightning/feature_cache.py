"""Extract backbone features once and keep them on disk, keyed by everything that determines them.

The key covers the backbone name, its weights, the read-out layers, the input transform and the data set's
samples (see ``SampleSet.fingerprint``), so a second run with another head or learning rate reuses the file,
and any change to what produces the features makes a new one. Files are written atomically.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tl_lightning.errors import TLError


def cache_key(**parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class FeatureCache:
    """Tensors on disk under ``<cache_dir>/features/<key>.pt`` (plus an in-process memo by file path)."""

    _memo: dict[str, dict] = {}

    def __init__(self, cache_dir: str, enabled: bool = True):
        self.root = os.path.join(cache_dir, "features")
        self.enabled = enabled

    def path(self, key: str) -> str:
        return os.path.join(self.root, f"{key}.pt")

    def load(self, key: str) -> Optional[dict]:
        if not self.enabled:
            return None
        if self.path(key) in self._memo:
            return self._memo[self.path(key)]
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated file from a killed run: recompute
            return None
        self._memo[self.path(key)] = value
        return value

    def save(self, key: str, value: dict) -> None:
        if not self.enabled:
            return
        self._memo[self.path(key)] = value
        path = self.path(key)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            os.makedirs(self.root, exist_ok=True)
            torch.save(value, tmp)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if e.errno == errno.ENOSPC:
                raise TLError(
                    f"no space left on the device while writing the feature cache to '{self.root}'; free space "
                    "or point --model.cache_dir (or $TL_LIGHTNING_CACHE) at a larger disk."
                ) from e
            raise TLError(f"cannot write the feature cache to '{self.root}' ({e.strerror}); set --model.cache_dir.") from e

    def get_or_compute(self, key: str, compute: Callable[[], dict]) -> dict:
        value = self.load(key)
        if value is None:
            value = compute()
            self.save(key, value)
        return value


@torch.no_grad()
def extract_features(extractor: nn.Module, loader: DataLoader, device: torch.device, desc: str = "features",
                     channels_last: bool = False) -> dict:
    """Run ``extractor`` over ``loader`` in eval mode: {'features': [N, D] float32, 'targets': [N, ...]}."""
    was_training = extractor.training
    extractor.eval()
    feats, targets = [], []
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats.append(extractor(x).float().cpu())
        targets.append(y)
    extractor.train(was_training)
    return {"features": torch.cat(feats), "targets": torch.cat(targets)}
