"""iCaRL with a frozen backbone: its features extracted once per split (``FeatureCache``) and served in place of
images, for training (deterministic transforms) and for the task end's herding and evaluation.

``CachedBackboneFeatures`` is a mixin of ``ICaRL``: it reads the module's ``net``, ``dm``, ``backbone_name`` and
``feature_cache``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import weights_id
from tl_lightning.feature_cache import cache_key, extract_features


class CachedBackboneFeatures:
    """Backbone features of whole splits, cached, and loaders over them."""

    def _cached_split(self, split: str) -> tuple[torch.Tensor, np.ndarray]:
        """Backbone features of the wrapped data set's whole deterministic ``split`` (independent of the class
        order, so every order reuses them) and the source indices of their rows."""
        base = self.dm.dataset.split_dataset(split, deterministic=True)
        key = cache_key(method="icarl", backbone=self.backbone_name, weights=weights_id(self.net.backbone),
                        dataset=base.fingerprint())

        def compute() -> dict:
            loader = self.dm.make_loader(base, shuffle=False)
            return extract_features(self.net.backbone, loader, self.device, desc=f"extracting {split} features")

        if self.trainer.world_size > 1:
            if self.trainer.is_global_zero:
                self.feature_cache.get_or_compute(key, compute)
            self.trainer.strategy.barrier("icarl_feature_cache")
        return self.feature_cache.get_or_compute(key, compute)["features"], base.indices

    def _cached_subset(self, split: str, dataset) -> TensorDataset:
        """``dataset`` (a view of the same source) as cached features and its class-order labels."""
        feats, indices = self._cached_split(split)
        order = np.argsort(indices)
        rows = torch.as_tensor(order[np.searchsorted(indices[order], dataset.indices)])
        return TensorDataset(feats[rows], torch.as_tensor(dataset.targets, dtype=torch.long))

    def _feature_loader(self, split: str, dataset, shuffle: bool) -> Optional[DataLoader]:
        if split == "predict" or (split == "train" and not self.dm.deterministic_train):
            return None
        return DataLoader(self._cached_subset(split, dataset), batch_size=self.dm.batch_size, shuffle=shuffle)

    def _eval_loader(self, split: str, dataset) -> DataLoader:
        if self.feature_cache.enabled:
            return DataLoader(self._cached_subset(split, dataset), batch_size=self.dm.batch_size, shuffle=False)
        return self.dm.make_loader(dataset, shuffle=False)
