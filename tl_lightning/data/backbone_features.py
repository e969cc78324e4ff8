"""A frozen backbone's features served in place of images: extracted once per split and cached.

A model whose backbone does not train (e.g. ``ICaRL(freeze_backbone=True)``) sees the same features every
epoch, so the data side extracts them once (``FeatureCache``: keyed by backbone, weights and the exact samples
and transform) and serves them as samples: a split becomes a :class:`FeatureRows` source, one feature vector per
sample in the split's order, with the split's targets. The model checks that the features were read with its
own weights (``feature_weights_id``) before it trains or evaluates.
"""
from __future__ import annotations

import numpy as np
import torch

from tl_lightning.backbones import create_backbone, weights_id
from tl_lightning.data.samples import SampleSet, Source
from tl_lightning.errors import TLError
from tl_lightning.feature_cache import FeatureCache, cache_key, extract_features
from tl_lightning.rng import generators_kept


class FeatureRows(Source):
    """Precomputed feature vectors as samples: ``load(i)`` is row ``i`` (a float tensor)."""

    def __init__(self, features: torch.Tensor, targets, name: str):
        self.features = features
        self.targets = np.asarray(targets)
        self.name = name

    def load(self, index: int) -> torch.Tensor:
        return self.features[index]

    def identity(self) -> str:
        return self.name  # the feature cache's key: backbone, weights, samples and transform


class BackboneFeatures:
    """Serves the pooled features of ``backbone`` with ``weights`` for the deterministic view of each split."""

    def __init__(self, backbone: str, weights: str, cache_dir: str):
        if weights == "none":
            raise TLError("feature_weights: none would extract features with a random backbone the model does not "
                          "share; give pretrained weights (bundled, hub or a checkpoint path) or serve images.")
        self.backbone_name = backbone
        with generators_kept():  # building the model draws its initial weights: the run's random stream stays
            self.model = create_backbone(backbone, weights, num_classes=0).eval().requires_grad_(False)
        #: the identity of the weights the features were read with (checked by the model)
        self.weights_id = weights_id(self.model)
        self.cache = FeatureCache(cache_dir)

    def split(self, name: str, dataset: SampleSet, make_loader, trainer=None) -> SampleSet:
        """``dataset`` (a deterministic view) as its features, rows in its order; ``trainer`` gives the device
        and, under DDP, lets rank 0 extract while the other ranks wait for the cache."""
        key = cache_key(method="backbone_features", backbone=self.backbone_name, weights=self.weights_id,
                        dataset=dataset.fingerprint())
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")

        def compute() -> dict:
            self.model.to(device)
            out = extract_features(self.model, make_loader(dataset, shuffle=False), device,
                                   desc=f"extracting {name} features")
            self.model.cpu()
            return out

        if trainer is not None and trainer.world_size > 1:
            if trainer.is_global_zero:
                self.cache.get_or_compute(key, compute)
            trainer.strategy.barrier("backbone_features")
        features = self.cache.get_or_compute(key, compute)["features"]
        return SampleSet(FeatureRows(features, dataset.targets, f"{name}:{key}"))
