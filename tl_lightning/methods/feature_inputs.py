"""What ``FeatureExtraction`` reads: the DataModule's served features, or images through its own backbone.

The model never builds loaders or pulls samples. Its arguments say which features it needs
(``served_features``: weights, read-outs, test-time views, layout, cache); the CLI links that request into the
DataModule's ``serve_features`` (see ``tl_lightning/data/served_features.py``), which extracts once per split
with its own copy of the backbone and serves batches ``{read-out: [B, D]}``. Before it fits or evaluates, the model
checks that the served features were read with its own weights and views and include its read-out; a full-batch
head, ``recipe: auto`` and the FNE statistics read whole splits through the public ``dm.feature_matrices(split)``.
Images (an augmented train split, ``predict``, a DataModule without served features) go through the backbone.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from tl_lightning.backbones import FeatureExtractor, weights_id
from tl_lightning.errors import TLError
from tl_lightning.methods.recipes import AUTO, CANDIDATES, FNE_LAYERS, fne_statistics, parse_recipe


#: the read-outs ``recipe: auto`` compares (those of its candidates)
AUTO_READOUTS = tuple(dict.fromkeys(r.layers for r in CANDIDATES))


def readouts_needed(recipe: Optional[str], layers: Union[str, list[str]], embedding: str) -> list:
    """The read-outs a model with these arguments may use: both candidates' for ``auto``, else its own."""
    if recipe == AUTO:
        return list(AUTO_READOUTS)
    pinned = parse_recipe(recipe)
    if pinned is not None:
        return [pinned.layers]
    return [FNE_LAYERS if embedding == "fne" and layers == "penultimate" else layers]


class FeatureInputs:
    """Mixin of ``FeatureExtraction``: needs ``extractor``, ``readout``, ``weights``, ``tta_views``, ``tta_crop``,
    ``embedding``, ``embed`` and the ``fne_mean``/``fne_std`` buffers."""

    @staticmethod
    def served_features(weights: str = "bundled", recipe: Optional[str] = None,
                        layers: Union[str, list[str]] = "penultimate", embedding: str = "pooled",
                        tta_views: int = 1, tta_crop: float = 0.875, channels_last: Union[bool, str] = "auto",
                        cache: bool = True, cache_dir: Optional[str] = None, **_) -> dict:
        """The DataModule's ``serve_features`` for a model built with these arguments (the CLI links it)."""
        return {"weights": weights, "readouts": readouts_needed(recipe, layers, embedding), "tta_views": tta_views,
                "tta_crop": tta_crop, "channels_last": channels_last, "cache": cache, "cache_dir": cache_dir}

    def served(self, dm, required: Optional[str] = None):
        """The DataModule's served features after checking they are this model's; None when it serves images
        (then ``required``, a reason, makes that one sentence)."""
        served = getattr(dm, "served_features", None)
        if served is None:
            if required:
                raise TLError(f"{required} needs the DataModule to serve the backbone's features; build it with "
                              "serve_features=FeatureExtraction.served_features(...) (the CLI does this).")
            return None
        if served.weights_id != self.backbone_weights_id():
            raise TLError("the DataModule serves features read with other weights than the model's backbone; give "
                          "serve_features the model's weights (the CLI links them from --model.weights).")
        needed = list(AUTO_READOUTS) if self.recipe == AUTO else [self.readout]
        missing = [key for key in needed if key not in served.readouts]
        if missing or (served.tta_views, served.tta_crop) != (self.tta_views, self.tta_crop):
            raise TLError(f"the DataModule serves read-outs {list(served.readouts)} with tta_views="
                          f"{served.tta_views}, tta_crop={served.tta_crop}, but the model reads {needed} "
                          f"with tta_views={self.tta_views}, tta_crop={self.tta_crop}; build serve_features from "
                          "the model's arguments (FeatureExtraction.served_features).")
        return served

    def backbone_weights_id(self) -> str:
        """The identity of the frozen backbone's weights (hashed once; loading a state dict clears it)."""
        if getattr(self, "_weights_id", None) is None:
            self._weights_id = weights_id(self.extractor.model)
        return self._weights_id

    def readout_extractor(self, layers) -> FeatureExtractor:
        """The current extractor if it reads ``layers``, else a new one on the same (shared) backbone."""
        extractor = FeatureExtractor(self.extractor.model, layers).eval()
        if extractor.layers == self.extractor.layers:
            extractor.remove_hooks()
            return self.extractor
        return extractor

    def raw_features(self, x) -> torch.Tensor:
        """A batch's raw read-out: picked from served features, or computed from images (4-D)."""
        if isinstance(x, dict):
            if self.readout not in x:
                raise TLError(f"the batch holds read-outs {list(x)}, not the model's '{self.readout}'.")
            return x[self.readout]
        if x.ndim == 4:
            with torch.no_grad():
                return self.extractor(x)
        return x  # features given directly

    def fit_fne_statistics(self, train: dict) -> None:
        """FNE standardisation from the raw read-out of the training split (``dm.feature_matrices('train')``)."""
        mean, std = fne_statistics(train[self.readout])
        self.fne_mean.copy_(mean.to(self.fne_mean))
        self.fne_std.copy_(std.to(self.fne_std))

    def embedded(self, matrices: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the embedding the head sees, targets) of a split's served features (FNE statistics fitted)."""
        with torch.no_grad():
            return self.embed(matrices[self.readout].to(self.fne_mean)).cpu(), matrices["targets"]

    def plot_features(self, split: str) -> dict:
        """The embedding of ``split`` and its targets, for ``callbacks.FeaturePlot``."""
        x, y = self.embedded(self.trainer.datamodule.feature_matrices(split))
        return {"features": x, "targets": y}
