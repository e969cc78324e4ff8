"""Cached backbone features for ``FeatureExtraction``: per split, per read-out, averaged over TTA views.

With deterministic inputs the backbone runs once per image and read-out: features go through
``tl_lightning.feature_cache`` (keyed by backbone, weights, read-out layers and the exact samples and
transform) and the DataModule's loaders serve them instead of images (``loader_hook``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import FeatureExtractor, weights_id
from tl_lightning.feature_cache import cache_key, extract_features
from tl_lightning.methods.recipes import fne_statistics
from tl_lightning.tta import view_transforms


class CachedFeatures:
    """Mixin of ``FeatureExtraction``: needs ``extractor``, ``feature_cache``, ``backbone_name``, ``tta_views``,
    ``tta_crop``, ``embedding``, ``embed`` and the ``fne_mean``/``fne_std`` buffers."""

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "loader_hook"):
            dm.loader_hook = self._feature_loader

    def _weights_key(self) -> str:
        if getattr(self, "_weights_key_value", None) is None:  # the backbone is frozen: hash its tensors once
            self._weights_key_value = weights_id(self.extractor.model)
        return self._weights_key_value

    def feature_key(self, dataset, extractor: Optional[FeatureExtractor] = None) -> str:
        """The feature cache's key for ``dataset`` read by ``extractor`` (default: the module's own)."""
        layers = (extractor or self.extractor).layers
        return cache_key(backbone=self.backbone_name, weights=self._weights_key(), layers=layers,
                         dataset=dataset.fingerprint())

    def cached_features(self, split: str, dataset, dm=None, extractor: Optional[FeatureExtractor] = None) -> dict:
        """Features of a deterministic ``dataset`` (from the cache, or extracted once and stored).

        ``dm`` (the DataModule that makes the loader) defaults to the trainer's, so this also works unattached;
        ``extractor`` (a read-out on the same backbone) defaults to the module's own.
        """
        extractor = extractor or self.extractor
        key = self.feature_key(dataset, extractor)
        dm = dm if dm is not None else self.trainer.datamodule

        def compute() -> dict:
            loader = dm.make_loader(dataset, shuffle=False)
            return extract_features(extractor, loader, self.device, desc=f"extracting {split} features")

        if self._trainer is None:
            return self.feature_cache.get_or_compute(key, compute)
        if self.trainer.world_size > 1 and self.feature_cache.enabled:
            if self.trainer.is_global_zero:
                self.feature_cache.get_or_compute(key, compute)
            self.trainer.strategy.barrier("feature_cache")
        return self.feature_cache.get_or_compute(key, compute)

    def split_features(self, split: str, dm=None, extractor: Optional[FeatureExtractor] = None) -> dict:
        """Raw backbone features of a split's deterministic inputs, averaged over ``tta_views`` cached views."""
        dm = dm if dm is not None else self.trainer.datamodule
        base = dm.split_dataset(split, deterministic=True)
        views = view_transforms(base.transform, self.tta_views, flips=getattr(dm, "hflip", 0) > 0, crop=self.tta_crop)
        per_view = [self.cached_features(split if i == 0 else f"{split} view {i + 1}/{len(views)}",
                                         base.with_transform(t), dm, extractor) for i, t in enumerate(views)]
        if len(per_view) == 1:
            return per_view[0]
        return {"features": torch.stack([v["features"] for v in per_view]).mean(0), "targets": per_view[0]["targets"]}

    def embedded_split(self, split: str, dm=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedding the head sees, targets) of a split, from cached features (FNE statistics must be fitted)."""
        feats = self.split_features(split, dm)
        with torch.no_grad():
            return self.embed(feats["features"].to(self.fne_mean)).cpu(), feats["targets"]

    def plot_features(self, split: str) -> dict:
        """The embedding of ``split`` and its targets, for ``callbacks.FeaturePlot``."""
        x, y = self.embedded_split(split)
        return {"features": x, "targets": y}

    def _feature_loader(self, split: str, dataset, shuffle: bool) -> Optional[DataLoader]:
        dm = self.trainer.datamodule
        if split == "train" and self.embedding == "fne":
            self._fit_fne_statistics(dm)
        if split == "train" and not dm.deterministic_train:
            return None  # augmented images: the backbone runs in the step
        if split == "predict":
            return None  # predictions keep the image order and the file names (views: ``predict_step``)
        feats = self.split_features(split, dm)
        data = TensorDataset(feats["features"], feats["targets"])
        return DataLoader(data, batch_size=dm.batch_size, shuffle=shuffle)

    def _fit_fne_statistics(self, dm) -> None:
        mean, std = fne_statistics(self.split_features("train", dm)["features"])
        self.fne_mean.copy_(mean.to(self.fne_mean))
        self.fne_std.copy_(std.to(self.fne_std))
