"""Feature extraction: a frozen pretrained backbone and a shallow head.

Off-the-shelf features read the penultimate layer (Razavian et al., "CNN Features off-the-shelf", 2014).
The full-network embedding (Garcia-Gasulla et al., 2018) reads the spatial mean of every stage, standardises
each feature with training-set statistics and discretises it to {-1, 0, 1} at thresholds -0.25 and 0.15.
With deterministic inputs the backbone runs once per image, across epochs and runs (``FeatureCache``).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import DEFAULT_BACKBONE, FeatureExtractor, create_backbone, weights_id
from tl_lightning.data.base import default_cache_dir
from tl_lightning.feature_cache import FeatureCache, cache_key, extract_features
from tl_lightning.methods.base import TransferModule, make_head

FNE_THRESHOLDS = (-0.25, 0.15)


class FeatureExtraction(TransferModule):
    """Frozen backbone (always in eval mode, BatchNorm statistics fixed) plus a linear or MLP head."""

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "bundled",
        layers: Union[str, list[str]] = "penultimate",
        embedding: Literal["pooled", "fne"] = "pooled",
        l2_normalize: bool = False,
        hidden_dim: int = 0,
        dropout: float = 0.0,
        cache: bool = True,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        """
        Args:
            backbone: any timm model name.
            weights: ``bundled``, ``hub``, ``none`` or a checkpoint path.
            layers: ``penultimate``, ``all`` (every stage + penultimate) or a list of module names.
            embedding: ``pooled`` (features as read) or ``fne`` (full-network embedding; implies ``layers=all``).
            l2_normalize: L2-normalise the embedding before the head.
            hidden_dim: 0 for a linear head, else the hidden width of a one-layer MLP head.
            dropout: dropout before the head's output layer.
            cache: keep extracted features on disk and reuse them (deterministic inputs only).
            cache_dir: feature cache folder; default ``$TL_LIGHTNING_CACHE`` or ``~/.cache/tl_lightning``.
        """
        super().__init__(**kwargs)
        self.backbone_name = backbone
        self.weights = weights
        if embedding == "fne" and layers == "penultimate":
            layers = "all"
        self.embedding = embedding
        self.l2_normalize = l2_normalize
        self.extractor = FeatureExtractor(create_backbone(backbone, weights, num_classes=0), layers)
        self.extractor.requires_grad_(False)
        self.extractor.eval()
        with torch.no_grad():
            size = self.extractor.model.pretrained_cfg.get("input_size", (3, 224, 224))
            self.feature_dim = self.extractor(torch.zeros(2, *size[:1], 32, 32)).shape[1]
        self.head = make_head(self.feature_dim, self.num_classes, hidden_dim, dropout)
        self.register_buffer("fne_mean", torch.zeros(self.feature_dim))
        self.register_buffer("fne_std", torch.ones(self.feature_dim))
        self.feature_cache = FeatureCache(cache_dir or default_cache_dir(), enabled=cache)

    # ----- the frozen backbone ------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.extractor.eval()  # BatchNorm statistics of the backbone never move
        return self

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw backbone features -> the embedding the head sees."""
        x = raw
        if self.embedding == "fne":
            x = (x - self.fne_mean) / self.fne_std
            lo, hi = FNE_THRESHOLDS
            x = (x > hi).to(x.dtype) - (x < lo).to(x.dtype)
        if self.l2_normalize:
            x = F.normalize(x, dim=1)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (4-D) go through the frozen backbone; cached features (2-D) pass straight through."""
        if x.ndim == 4:
            with torch.no_grad():
                x = self.extractor(x)
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    # ----- cached features ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "loader_hook"):
            dm.loader_hook = self._feature_loader

    def cached_features(self, split: str, dataset) -> dict:
        """Features of a deterministic ``dataset`` (from the cache, or extracted once and stored)."""
        key = cache_key(backbone=self.backbone_name, weights=weights_id(self.weights), layers=self.extractor.layers,
                        dataset=dataset.fingerprint())
        dm = self.trainer.datamodule

        def compute() -> dict:
            loader = dm.make_loader(dataset, shuffle=False)
            return extract_features(self.extractor, loader, self.device, desc=f"extracting {split} features")

        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and self.feature_cache.enabled:
            if self.trainer.is_global_zero:
                self.feature_cache.get_or_compute(key, compute)
            strategy.barrier("feature_cache")
        return self.feature_cache.get_or_compute(key, compute)

    def _feature_loader(self, split: str, dataset, shuffle: bool) -> Optional[DataLoader]:
        dm = self.trainer.datamodule
        if split == "train" and self.embedding == "fne":
            self._fit_fne_statistics(dm)
        if split == "train" and not dm.deterministic_train:
            return None  # augmented images: the backbone runs in the step
        if split == "predict":
            return None  # predictions keep the image order and the file names
        feats = self.cached_features(split, dm.split_dataset(split, deterministic=True))
        data = TensorDataset(feats["features"], feats["targets"])
        return DataLoader(data, batch_size=dm.batch_size, shuffle=shuffle)

    def _fit_fne_statistics(self, dm) -> None:
        train = self.cached_features("train", dm.split_dataset("train", deterministic=True))["features"]
        self.fne_mean.copy_(train.mean(0).to(self.fne_mean))
        self.fne_std.copy_(train.std(0).clamp(min=1e-6).to(self.fne_std))

    # ----- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_metrics("train", logits, y)
        return loss

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.loss(logits, y), on_step=False, on_epoch=True)
        self.log_metrics(stage, logits, y)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.head.parameters()), "lr": self.lr, "name": "head"}]
