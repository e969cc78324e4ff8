"""Callback: after fit, a 2-D embedding of a split's features, coloured by class (and by domain), as a PNG.

Features come from the module's ``plot_features(split)`` where it has one: a dict with ``features`` [N, D],
``targets`` and, for adaptation runs, ``domains`` [N] (ints) and ``domain_names``. Otherwise a module with a
``features(images)`` method is run over the split's deterministic inputs.
"""
from __future__ import annotations

import os
from typing import Literal, Optional, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch

from tl_lightning.errors import TLError
from tl_lightning.plots import embed_2d, log_image, plot_embedding


@runtime_checkable
class PlotsFeatures(Protocol):
    """A model that gives its own embedding of a split (e.g. ``FeatureExtraction``: the served features)."""

    def plot_features(self, split: str) -> dict: ...


@runtime_checkable
class EmbedsImages(Protocol):
    """A model whose ``features`` maps a batch of images to its embedding."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...


class FeaturePlot(L.Callback):
    """Writes ``<run dir>/features_<split>_<method>.png`` when fit ends and logs it to image-capable loggers."""

    def __init__(self, method: Literal["pca", "tsne"] = "pca", split: str = "test", max_points: int = 2000,
                 seed: int = 0):
        """
        Args:
            method: ``pca`` (fast) or ``tsne``.
            split: which split's features to plot (``train``, ``val``, ``test``).
            max_points: plot at most this many points (a seeded random subset).
            seed: seed of the subset and of t-SNE.
        """
        self.method = method
        self.split = split
        self.max_points = max_points
        self.seed = seed
        self.last_path: Optional[str] = None

    def collect(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict:
        if isinstance(pl_module, PlotsFeatures):
            return pl_module.plot_features(self.split)
        if not isinstance(pl_module, EmbedsImages):
            raise TLError(f"FeaturePlot needs a module with plot_features(split) or features(images); "
                          f"{type(pl_module).__name__} has neither.")
        dm = trainer.datamodule
        loader = dm.make_loader(dm.split_dataset(self.split, deterministic=True), shuffle=False)
        feats, targets = [], []
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            for x, y in loader:
                feats.append(pl_module.features(x.to(pl_module.device)).float().cpu())
                targets.append(y)
        pl_module.train(was_training)
        return {"features": torch.cat(feats), "targets": torch.cat(targets)}

    def on_fit_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        data = self.collect(trainer, pl_module)
        features = np.asarray(data["features"], dtype=np.float64)
        targets = np.asarray(data["targets"])
        domains = data.get("domains")
        keep = np.arange(len(features))
        if len(keep) > self.max_points:
            keep = np.sort(np.random.default_rng(self.seed).choice(len(keep), self.max_points, replace=False))
        points = embed_2d(features[keep], self.method, self.seed)
        path = os.path.join(trainer.default_root_dir, f"features_{self.split}_{self.method}.png")
        plot_embedding(points, targets[keep], path, class_names=getattr(pl_module, "class_names", None),
                       domains=None if domains is None else np.asarray(domains)[keep],
                       domain_names=data.get("domain_names"), title=f"{self.split} features ({self.method})")
        self.last_path = path
        log_image(trainer, f"features/{self.split}_{self.method}", path)
