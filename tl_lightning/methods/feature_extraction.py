"""Feature extraction: a frozen pretrained backbone and a shallow head.

Off-the-shelf features read the penultimate layer (Razavian et al., "CNN Features off-the-shelf", 2014).
The full-network embedding (Garcia-Gasulla et al., 2018) reads the spatial mean of every stage, standardises
each feature with training-set statistics and discretises it to {-1, 0, 1} at thresholds -0.25 and 0.15.
With deterministic inputs the backbone runs once per image, across epochs and runs (``FeatureCache``).

Heads (``head``): ``linear`` is trained by SGD over epochs like any Lightning model; ``svm`` (CNN-SVM,
Razavian et al. 2014) and ``logistic`` (L-BFGS with the L2 strength picked on val, Kornblith et al. 2019) are
fitted in full batch on the cached features when fit starts (``on_fit_start``), see ``shallow_heads``. For
those, training runs a single epoch that only measures the fitted head, then stops, so ``max_epochs`` does
not matter. ``tta_views > 1`` averages the features of deterministic crops and flips (Razavian's "aug"),
each view cached on its own (``tl_lightning.tta``).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tl_lightning.backbones import DEFAULT_BACKBONE, FeatureExtractor, create_backbone, weights_id
from tl_lightning.data.base import default_cache_dir
from tl_lightning.feature_cache import FeatureCache, cache_key, extract_features
from tl_lightning.errors import TLError
from tl_lightning.methods.base import TransferModule, make_head
from tl_lightning.methods.shallow_heads import DEFAULT_REG_GRID, fit_logistic, fit_svm, sweep_logistic
from tl_lightning.tta import view_transforms

FNE_THRESHOLDS = (-0.25, 0.15)
HEADS = ("linear", "svm", "logistic")


class FeatureExtraction(TransferModule):
    """Frozen backbone (always in eval mode, BatchNorm statistics fixed) plus a linear/MLP, SVM or logistic head."""

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
        head: Literal["linear", "svm", "logistic"] = "linear",
        svm_c: float = 1.0,
        reg_grid: Optional[list[float]] = None,
        lbfgs_max_iter: int = 500,
        tta_views: int = 1,
        tta_crop: float = 0.875,
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
            head: ``linear`` (SGD over epochs; an MLP with ``hidden_dim``), ``svm`` (one-vs-rest squared-hinge
                linear SVM, Razavian et al. 2014) or ``logistic`` (L-BFGS, L2 strength chosen on val from
                ``reg_grid``, refitted on train+val, Kornblith et al. 2019). ``svm``/``logistic`` are fitted in
                full batch on cached features when fit starts; training then runs one epoch (``max_epochs``
                is ignored) and needs ``data.augment=false``.
            svm_c: the SVM's C (LIBLINEAR / scikit-learn ``LinearSVC`` convention).
            reg_grid: L2 strengths of the logistic head's sweep (on the mean loss; scikit-learn's
                ``C = 1 / (reg * N)``); default 17 values log-spaced over [1e-6, 1e2].
            lbfgs_max_iter: L-BFGS iterations per fit of the ``svm``/``logistic`` head.
            tta_views: number of deterministic views (full image, flip, five crops, flipped crops) whose
                features are averaged for every split, each view cached separately; 1 = no augmentation.
            tta_crop: share of the image side the TTA crops keep.
        """
        super().__init__(**kwargs)
        if head not in HEADS:
            raise TLError(f"unknown head '{head}'; choose one of {', '.join(HEADS)} (--model.head).")
        if head != "linear" and hidden_dim:
            raise TLError(f"the {head} head is linear; set --model.hidden_dim=0 or use --model.head=linear.")
        if tta_views < 1:
            raise TLError(f"tta_views must be at least 1 (got {tta_views}); fix --model.tta_views.")
        self.head_type = head
        self.svm_c = svm_c
        self.reg_grid = list(reg_grid) if reg_grid else list(DEFAULT_REG_GRID)
        self.lbfgs_max_iter = lbfgs_max_iter
        self.tta_views = tta_views
        self.tta_crop = tta_crop
        self.head_fit: dict = {}  # how the svm/logistic head was fitted (into metrics.json)
        # the shallow heads are fitted in closed loop, not by Lightning's optimizer
        self.automatic_optimization = head == "linear"
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
            channels = self.extractor.model.pretrained_cfg.get("input_size", (3,))[0]
            self.feature_dim = self.extractor(torch.zeros(2, channels, 32, 32)).shape[1]
        self.head = make_head(self.feature_dim, self.num_classes, hidden_dim, dropout if head == "linear" else 0.0)
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

    def _weights_key(self) -> str:
        if getattr(self, "_weights_key_value", None) is None:  # the backbone is frozen: hash its tensors once
            self._weights_key_value = weights_id(self.extractor.model)
        return self._weights_key_value

    def cached_features(self, split: str, dataset, dm=None) -> dict:
        """Features of a deterministic ``dataset`` (from the cache, or extracted once and stored).

        ``dm`` (the DataModule that makes the loader) defaults to the trainer's, so this also works unattached.
        """
        key = cache_key(backbone=self.backbone_name, weights=self._weights_key(), layers=self.extractor.layers,
                        dataset=dataset.fingerprint())
        dm = dm if dm is not None else self.trainer.datamodule

        def compute() -> dict:
            loader = dm.make_loader(dataset, shuffle=False)
            return extract_features(self.extractor, loader, self.device, desc=f"extracting {split} features")

        if self._trainer is None:
            return self.feature_cache.get_or_compute(key, compute)
        strategy = self.trainer.strategy
        if self.trainer.world_size > 1 and self.feature_cache.enabled:
            if self.trainer.is_global_zero:
                self.feature_cache.get_or_compute(key, compute)
            strategy.barrier("feature_cache")
        return self.feature_cache.get_or_compute(key, compute)

    def split_features(self, split: str, dm=None) -> dict:
        """Raw backbone features of a split's deterministic inputs, averaged over ``tta_views`` cached views."""
        dm = dm if dm is not None else self.trainer.datamodule
        base = dm.split_dataset(split, deterministic=True)
        views = view_transforms(base.transform, self.tta_views, flips=getattr(dm, "hflip", 0) > 0, crop=self.tta_crop)
        per_view = [self.cached_features(split if i == 0 else f"{split} view {i + 1}/{len(views)}",
                                         base.with_transform(t), dm) for i, t in enumerate(views)]
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
            return None  # predictions keep the image order and the file names
        feats = self.split_features(split, dm)
        data = TensorDataset(feats["features"], feats["targets"])
        return DataLoader(data, batch_size=dm.batch_size, shuffle=shuffle)

    def _fit_fne_statistics(self, dm) -> None:
        train = self.split_features("train", dm)["features"]
        self.fne_mean.copy_(train.mean(0).to(self.fne_mean))
        self.fne_std.copy_(train.std(0).clamp(min=1e-6).to(self.fne_std))

    # ----- the full-batch heads (svm, logistic) --------------------------------------------------------------
    @property
    def fitted_head(self) -> bool:
        return self.head_type != "linear"

    def on_fit_start(self) -> None:
        if self.fitted_head:
            self.fit_head(self.trainer.datamodule)

    def fit_head(self, dm) -> dict:
        """Fit the ``svm``/``logistic`` head in full batch on the cached train (and val) embeddings."""
        if not dm.deterministic_train:
            raise TLError(f"the {self.head_type} head is fitted once on fixed features, so training augmentation "
                          "cannot apply; set --data.augment=false (use --model.tta_views for crops and flips).")
        if self.embedding == "fne":
            self._fit_fne_statistics(dm)
        x_train, y_train = self.embedded_split("train", dm)
        task = dict(num_classes=self.num_classes, multilabel=self.multilabel)
        if self.head_type == "svm":
            fit = fit_svm(x_train, y_train, C=self.svm_c, max_iter=self.lbfgs_max_iter, **task)
            info = {"head": "svm", "C": self.svm_c}
        else:
            x_val, y_val = self.embedded_split("val", dm)
            sweep = sweep_logistic(x_train, y_train, x_val, y_val, grid=self.reg_grid,
                                   max_iter=self.lbfgs_max_iter, **task)
            fit = fit_logistic(torch.cat([x_train, x_val]), torch.cat([y_train, y_val]), reg=sweep.best_reg,
                               max_iter=self.lbfgs_max_iter, init=sweep.fits[sweep.grid.index(sweep.best_reg)],
                               **task)
            info = {"head": "logistic", **sweep.as_dict(), "refit_on": "train+val"}
        with torch.no_grad():
            self.head.weight.copy_(fit.weight.to(self.head.weight))
            self.head.bias.copy_(fit.bias.to(self.head.bias))
        info.update(lbfgs_iterations=fit.iterations, objective=fit.objective, fit_seconds=round(fit.seconds, 3),
                    tta_views=self.tta_views)
        self.head_fit = info
        return info

    def on_train_epoch_end(self) -> None:
        if self.fitted_head:
            self.trainer.should_stop = True  # the head is already fitted: one measuring epoch is enough

    def results(self) -> dict:
        return {"head_fit": self.head_fit} if self.head_fit else {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["head_fit"] = self.head_fit

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.head_fit = checkpoint.get("head_fit", {}) or {}

    # ----- steps --------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Optional[torch.Tensor]:
        x, y = batch
        if self.fitted_head:  # measure the fitted head on the training split; nothing to optimise
            with torch.no_grad():
                self.log_metrics("train", self(x), y)
            return None
        return self.supervised_step("train", batch)

    def _eval_step(self, stage: str, batch) -> None:
        self.supervised_step(stage, batch)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.head.parameters()), "lr": self.lr, "name": "head"}]
