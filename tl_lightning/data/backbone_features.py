"""A frozen backbone's features served in place of images: extracted once per split and cached.

A model whose backbone does not train (``FeatureExtraction``, ``ICaRL(freeze_backbone=True)``) sees the same
features every epoch, so the data side extracts them once (``FeatureCache``: keyed by backbone, weights,
read-out and the exact samples and transform) with its own copy of the backbone, and serves them as samples: a
split becomes a :class:`FeatureRows` source, one feature vector per sample in the split's order (or one per
read-out, ``{read-out: vector}``), with the split's targets. The model checks that the features were read with
its own weights (``weights_id``) before it trains or evaluates.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from tl_lightning.backbones import frozen_backbone, is_convnet, weights_id
from tl_lightning.backbones.features import ReadoutSet, resolve_layers
from tl_lightning.data.samples import SampleSet, Source
from tl_lightning.feature_cache import FeatureCache, cache_key, extract_features
from tl_lightning.rng import generators_kept


class FeatureRows(Source):
    """Precomputed feature vectors as samples: ``load(i)`` is row ``i`` (a float tensor), or with one matrix per
    read-out, ``{read-out: row i}``."""

    def __init__(self, features: Union[torch.Tensor, dict[str, torch.Tensor]], targets, name: str):
        self.features = features
        self.targets = np.asarray(targets)
        self.name = name

    def load(self, index: int):
        if isinstance(self.features, dict):
            return {key: matrix[index] for key, matrix in self.features.items()}
        return self.features[index]

    def identity(self) -> str:
        return self.name  # the feature cache's key: backbone, weights, samples and transform


class BackboneFeatures:
    """Extracts the features of ``backbone`` with ``weights`` (its own frozen copy) for deterministic sample sets.

    ``channels_last`` (``auto``: on for a convnet) is the layout the model's own backbone runs in, so the served
    features are those the model would compute; ``cache=False`` keeps them in memory only.
    """

    def __init__(self, backbone: str, weights: str, cache_dir: str, cache: bool = True,
                 channels_last: Union[bool, str] = False):
        self.backbone_name = backbone
        with generators_kept():  # building the model draws its initial weights: the run's random stream stays
            self.model = frozen_backbone(backbone, weights)
        #: the identity of the weights the features were read with (checked by the model)
        self.weights_id = weights_id(self.model)
        self.channels_last = is_convnet(self.model) if channels_last == "auto" else bool(channels_last)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.cache = FeatureCache(cache_dir, enabled=cache)

    def key(self, dataset: SampleSet, layers: Optional[list[str]] = None) -> str:
        """The feature cache's key of ``dataset`` read at module names ``layers`` (None: the pooled output)."""
        if layers is None:
            return cache_key(method="backbone_features", backbone=self.backbone_name, weights=self.weights_id,
                             dataset=dataset.fingerprint())
        return cache_key(backbone=self.backbone_name, weights=self.weights_id, layers=list(layers),
                         dataset=dataset.fingerprint())

    def _read(self, reader, name: str, dataset: SampleSet, make_loader, trainer) -> dict:
        """One pass of ``reader`` (this backbone or read-outs of it) over ``dataset`` on the trainer's device."""
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        self.model.to(device)
        out = extract_features(reader, make_loader(dataset, shuffle=False), device,
                               desc=f"extracting {name} features", channels_last=self.channels_last)
        self.model.cpu()
        return out

    def _rank_zero_first(self, trainer, fill):
        """``fill()``, which reads the cache and fills what it lacks; under DDP rank 0 fills it first while the
        other ranks wait, so they only read."""
        if trainer is not None and trainer.world_size > 1 and self.cache.enabled:
            filled = fill() if trainer.is_global_zero else None
            trainer.strategy.barrier("backbone_features")
            if filled is not None:
                return filled
        return fill()

    def extract(self, name: str, dataset: SampleSet, make_loader, trainer=None) -> dict:
        """``{'features': [N, D], 'targets'}``: the pooled output for ``dataset`` in its order, from the cache or
        extracted once (``trainer``: the device, and DDP)."""
        key = self.key(dataset)
        return self._rank_zero_first(trainer, lambda: self.cache.get_or_compute(
            key, lambda: self._read(self.model, name, dataset, make_loader, trainer)))

    def extract_readouts(self, name: str, dataset: SampleSet, make_loader, readouts: dict, trainer=None) -> dict:
        """``{read-out name: [N, D], 'targets'}`` for ``readouts`` (name -> layers), each cached under its own
        key; the ones not cached are extracted together, in one pass over ``dataset``."""
        keys = {k: self.key(dataset, resolve_layers(self.model, layers)) for k, layers in readouts.items()}

        def fill() -> dict:
            values = {k: self.cache.load(key) for k, key in keys.items()}
            missing = {k: readouts[k] for k, v in values.items() if v is None}
            if missing:
                reader = ReadoutSet(self.model, missing)
                with generators_kept():  # a loader draws seeds: a run that extracts draws what a cached one does
                    out = self._read(reader, name, dataset, make_loader, trainer)
                reader.remove_hooks()
                for k in missing:
                    values[k] = {"features": out["features"][k], "targets": out["targets"]}
                    self.cache.save(keys[k], values[k])
            return values

        values = self._rank_zero_first(trainer, fill)
        return {**{k: v["features"] for k, v in values.items()}, "targets": next(iter(values.values()))["targets"]}

    def split(self, name: str, dataset: SampleSet, make_loader, trainer=None) -> SampleSet:
        """``dataset`` (a deterministic view) as its pooled features, rows in its order."""
        features = self.extract(name, dataset, make_loader, trainer)["features"]
        return SampleSet(FeatureRows(features, dataset.targets, f"{name}:{self.key(dataset)}"))
