"""Features of a frozen backbone served in place of images, for a model that reads them (``FeatureExtraction``).

The request comes from the config, not from the model object: the CLI links it from the model's arguments into
the DataModule's ``serve_features`` (``FeatureExtraction.served_features``), as it links ``backbone``. It names the
backbone's weights, the read-outs the model may use (``recipe: auto`` compares two), the test-time views to
average, the memory layout and the cache:

    {weights: bundled, readouts: [penultimate, every_conv], tta_views: 1, tta_crop: 0.875,
     channels_last: auto, cache: true, cache_dir: null}

The data side extracts each split's deterministic view once per view, every read-out from the same forward pass
(``BackboneFeatures``: each read-out cached on its own, rank 0 first under DDP), averages the views, and serves rows ``{read-out: vector}`` with the
split's targets. The train split keeps its images when it is augmented, and ``predict`` keeps its images (file
names, order). The model picks its read-out from each batch, and checks the weights' identity, the read-outs and
the views before it fits or evaluates (one sentence on a mismatch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset

from tl_lightning.backbones import readout_key
from tl_lightning.data.backbone_features import BackboneFeatures
from tl_lightning.data.samples import SampleSet
from tl_lightning.errors import TLError
from tl_lightning.tta import view_transforms

REQUEST_KEYS = ("weights", "readouts", "tta_views", "tta_crop", "channels_last", "cache", "cache_dir")


def images_only(request: Optional[dict], datamodule: str) -> None:
    """One sentence when ``serve_features`` reaches a DataModule that serves images only."""
    if request is not None:
        raise TLError(f"{datamodule} serves images only, so it cannot serve a frozen backbone's features; "
                      "FeatureExtraction reads a DataModule of one data set (e.g. CUB200DataModule).")


class ServedFeatures:
    """One request (see the module docstring) for ``backbone``; ``flips``: the data set's views may mirror."""

    def __init__(self, request: dict, backbone: str, cache_dir: str, flips: bool):
        unknown = sorted(set(request) - set(REQUEST_KEYS))
        if unknown or "weights" not in request or not request.get("readouts"):
            raise TLError(f"serve_features takes weights, readouts and optionally {', '.join(REQUEST_KEYS[2:])} "
                          f"(got {sorted(request)}); the CLI fills it in from the model, so leave it out of "
                          "configs.")
        self.backbone = backbone
        self.weights = request["weights"]
        #: read-out name (``readout_key``) -> its layers, in the order of the request
        self.readouts = {readout_key(layers): layers for layers in request["readouts"]}
        self.tta_views = int(request.get("tta_views", 1))
        self.tta_crop = float(request.get("tta_crop", 0.875))
        self.channels_last = request.get("channels_last", False)
        self.cache = bool(request.get("cache", True))
        self.cache_dir = request.get("cache_dir") or cache_dir
        self.flips = flips
        view_transforms(None, self.tta_views, flips, self.tta_crop)  # bad views fail here, before any run starts
        self._source: Optional[BackboneFeatures] = None
        self._matrices: dict[str, dict] = {}

    @property
    def source(self) -> BackboneFeatures:
        """The data side's own frozen copy of the backbone (built on first use)."""
        if self._source is None:
            self._source = BackboneFeatures(self.backbone, self.weights, self.cache_dir, cache=self.cache,
                                            channels_last=self.channels_last)
        return self._source

    @property
    def weights_id(self) -> str:
        """The identity of the weights the features are read with (the model checks it against its own)."""
        return self.source.weights_id

    def matrices(self, split: str, dataset: SampleSet, make_loader, trainer=None) -> dict:
        """``{read-out: [N, D], 'targets': [N, ...]}`` of ``dataset`` (``split``'s deterministic view), each
        read-out averaged over the ``tta_views`` views; extracted once per split (and samples: a changed split is
        read again)."""
        memo = f"{split}:{dataset.fingerprint()}"
        if memo in self._matrices:
            return self._matrices[memo]
        views = view_transforms(dataset.transform, self.tta_views, self.flips, self.tta_crop)
        # the views are summed as they arrive, never in place on a view's own tensors (the feature cache may
        # share them with another user): averaging adds one matrix per read-out, not a stacked copy of every view
        # plus its mean. The result is bitwise the stacked mean up to 4 views, and within 1 ulp of it beyond.
        out: dict = {}
        for i, transform in enumerate(views):
            view = self.source.extract_readouts(split if i == 0 else f"{split} view {i + 1}/{len(views)}",
                                                dataset.with_transform(transform), make_loader, self.readouts, trainer)
            if i == 0:
                out = {key: view[key] for key in self.readouts}
                out["targets"] = view["targets"]
            else:
                for key in self.readouts:
                    out[key] = out[key] + view[key] if i == 1 else out[key].add_(view[key])
        if len(views) > 1:
            for key in self.readouts:
                out[key].div_(len(views))
        self._matrices[memo] = out
        return out

    def loader(self, matrices: dict, batch_size: int, shuffle: bool) -> DataLoader:
        """Batches ``({read-out: [B, D]}, targets)`` of a split's served features (in-process: rows in memory)."""
        table = FeatureTable({key: matrices[key] for key in self.readouts}, matrices["targets"])
        return DataLoader(table, batch_size=batch_size, shuffle=shuffle, collate_fn=fetched_batch)


class FeatureTable(Dataset):
    """A split's feature matrices and targets; the loader fetches a whole batch by indexing (``__getitems__``)."""

    def __init__(self, features: dict[str, torch.Tensor], targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return {key: matrix[index] for key, matrix in self.features.items()}, self.targets[index]

    def __getitems__(self, indices: list[int]):
        rows = torch.as_tensor(indices, dtype=torch.long)
        return {key: matrix[rows] for key, matrix in self.features.items()}, self.targets[rows]


def fetched_batch(batch):
    """The loader's collate: ``FeatureTable.__getitems__`` already returns the batch."""
    return batch
