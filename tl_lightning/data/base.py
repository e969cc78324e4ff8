"""Shared DataModule behaviour: splits, low-data subsets, backbone-derived transforms, loaders, errors.

A dataset file subclasses :class:`TLDataModule` and implements two things:

* ``classes`` - the class names (read from the metadata present, so subsets work);
* ``build_split(split)`` - a :class:`Source` for ``train``/``val``/``test``, or ``None`` when the data set has
  no official split of that name (validation and test are then carved out of train, stratified, with ``seed``).

Every split is served as a :class:`SampleSet`: a view (indices + transform) of a source, with ``targets``
(``samples.py``, re-exported here).
Multi-class targets are class indices; multi-label targets are float vectors in {0, 1}, with -1 marking a
label to ignore in the loss and the metric (e.g. VOC's "difficult" objects).
"""
from __future__ import annotations

import os
from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tl_lightning.backbones import DEFAULT_BACKBONE, data_config
from tl_lightning.data.samples import (ArraySource, FileSource, SampleSet, Source, check_batch_size,  # noqa: F401
                                       open_image, per_class_subset, stratified_split)
from tl_lightning.data.served_features import ServedFeatures
from tl_lightning.errors import TLError

SPLITS = ("train", "val", "test")


def default_cache_dir() -> str:
    """Where unpacked data and feature caches go (``$TL_LIGHTNING_CACHE`` or ``~/.cache/tl_lightning``)."""
    return os.environ.get("TL_LIGHTNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tl_lightning")


def default_num_workers() -> int:
    """Half the visible cores, at most 8: leaves cores for the model's own threads."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // 2))


class TLDataModule(L.LightningDataModule):
    """Base DataModule of tl_lightning (see module docstring for the contract)."""

    multilabel: bool = False
    #: data-set specific augmentation: horizontal flips make sense for photos, not for digits
    hflip: float = 0.5
    #: RandomResizedCrop scale range used when ``augment`` is on
    augment_scale: tuple[float, float] = (0.08, 1.0)
    #: eval-time crop fraction; None keeps the backbone's own
    crop_pct: Optional[float] = None

    def __init__(
        self,
        data_dir: Optional[str] = None,
        batch_size: int = 64,
        num_workers: Optional[int] = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        samples_per_class: Optional[int] = None,
        train_fraction: Optional[float] = None,
        augment: bool = False,
        augment_scale: Optional[tuple[float, float]] = None,
        backbone: str = DEFAULT_BACKBONE,
        image_size: Optional[int] = None,
        persistent_workers: bool = True,
        pin_memory: bool = True,
        cache_dir: Optional[str] = None,
        report: bool = False,
        bad_images: Literal["drop", "fail", "ignore"] = "drop",
        predict_dir: Optional[str] = None,
        serve_features: Optional[dict] = None,
    ):
        """
        Args:
            data_dir: folder that holds the data set in its official layout.
            batch_size: samples per batch.
            num_workers: loader processes; default half the cores (at most 8).
            val_fraction: share of train carved out for validation where there is no official val split.
            test_fraction: share of train carved out for test where there is no official test split.
            seed: seed of every carve-out and low-data subset.
            samples_per_class: keep at most this many training samples per class (low-data setting).
            train_fraction: keep this fraction of the training set (stratified).
            augment: random-resized-crop (and flip where it makes sense) on the training split.
            augment_scale: the random-resized-crop's range of area fractions, e.g. ``[0.35, 1.0]``; default the
                data set's own (``(0.08, 1.0)``, Inception's, unless the data set says otherwise).
            backbone: timm model whose data config sets input size and normalisation (linked from the model).
            image_size: override the backbone's input size (pixels, square).
            persistent_workers: keep loader workers alive between epochs.
            pin_memory: pin host memory when training on an accelerator.
            cache_dir: where unpacked data goes; default ``$TL_LIGHTNING_CACHE`` or ``~/.cache/tl_lightning``.
            report: before training, check that every image file decodes and print a data report
                (images per class per split, smallest class, unreadable files; see ``data/report.py``).
            bad_images: with ``report``, image files that do not decode are ``drop``-ped (with a warning),
                ``fail`` the run, or are not checked (``ignore``).
            predict_dir: ``predict`` classifies the images in this folder instead of the test split.
            serve_features: serve a frozen backbone's features instead of images (``served_features.py``); the
                CLI fills it in from a model that reads them (``FeatureExtraction``), so configs leave it out.
        """
        super().__init__()
        if val_fraction < 0 or val_fraction >= 1 or test_fraction < 0 or test_fraction >= 1:
            raise TLError("val_fraction and test_fraction must be in [0, 1); fix --data.val_fraction/test_fraction.")
        if train_fraction is not None and not 0 < train_fraction <= 1:
            raise TLError("train_fraction must be in (0, 1]; fix --data.train_fraction.")
        check_batch_size(batch_size)
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.samples_per_class = samples_per_class
        self.train_fraction = train_fraction
        self.augment = augment
        if augment_scale is not None:
            low, high = augment_scale
            if not 0 < low <= high <= 1:
                raise TLError(f"augment_scale must be two area fractions 0 < low <= high <= 1 (got "
                              f"{list(augment_scale)}); e.g. --data.augment_scale=[0.35,1.0].")
            self.augment_scale = (float(low), float(high))
        self.backbone = backbone
        self.image_size = image_size
        if image_size is not None:
            data_config(backbone, image_size)  # a size the backbone cannot take fails here, before any run starts
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.cache_dir = cache_dir or default_cache_dir()
        self.report = report
        self.bad_images = bad_images
        self.predict_dir = predict_dir
        #: the data report of the last ``setup`` (``report=True``), also written to ``metrics.json``
        self.data_report = None
        self._unreadable: dict[str, str] = {}
        self.splits: dict[str, SampleSet] = {}
        #: the frozen backbone's features served instead of images (None: images are served)
        self.served_features = None if serve_features is None else ServedFeatures(
            serve_features, backbone, self.cache_dir, flips=self.hflip > 0)

    # ----- what a data set file implements -------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        raise NotImplementedError

    def build_split(self, split: str) -> Optional[Source]:
        raise NotImplementedError

    # ----- task facts, linked into the model by the CLI -------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    # ----- transforms --------------------------------------------------------------------------------------
    def data_config(self) -> dict:
        cfg = data_config(self.backbone, self.image_size)
        if self.crop_pct is not None:
            cfg["crop_pct"] = self.crop_pct
        return cfg

    def eval_transform(self):
        from timm.data import create_transform

        return create_transform(**self.data_config(), is_training=False)

    def train_transform(self):
        if not self.augment:
            return self.eval_transform()
        from timm.data import create_transform

        cfg = self.data_config()
        return create_transform(
            input_size=cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
            mean=cfg["mean"], std=cfg["std"], hflip=self.hflip, scale=self.augment_scale,
        )

    # ----- splits ------------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits or (stage == "predict" and self.predict_dir):
            return
        eval_t = self.eval_transform()
        train_src = self.build_split("train")
        val_src = self.build_split("val")
        test_src = self.build_split("test")
        train = self.readable(SampleSet(train_src, transform=eval_t))
        if test_src is None:
            keep, carved = stratified_split(train.targets, self.test_fraction, self.seed + 1)
            test, train = train.subset(carved), train.subset(keep)
        else:
            test = self.readable(SampleSet(test_src, transform=eval_t))
        if val_src is None:
            keep, carved = stratified_split(train.targets, self.val_fraction, self.seed)
            val, train = train.subset(carved), train.subset(keep)
        else:
            val = self.readable(SampleSet(val_src, transform=eval_t))
        if self.samples_per_class:
            train = train.subset(per_class_subset(train.targets, self.samples_per_class, self.seed))
        if self.train_fraction and self.train_fraction < 1:
            keep, _ = stratified_split(train.targets, 1 - self.train_fraction, self.seed + 2)
            train = train.subset(keep)
        self.splits = {"train": train.with_transform(self.train_transform()), "val": val, "test": test}
        if self.report:
            from tl_lightning.data.report import DataReport

            self.data_report = DataReport.of(self.__class__.__name__, self.classes, self.splits,
                                              self._unreadable, self.bad_images)
            self.data_report.emit()

    def readable(self, dataset: SampleSet) -> SampleSet:
        """With ``report`` on, ``dataset`` without the image files that do not decode (recorded for the report)."""
        if not self.report:
            return dataset
        from tl_lightning.data.report import drop_unreadable

        kept, bad = drop_unreadable(dataset, self.bad_images, self.cache_dir)
        self._unreadable.update(bad)
        return kept

    def predict_dataset(self) -> SampleSet:
        """The images under ``predict_dir`` (recursively), in sorted order, with unknown (-1) targets."""
        from tl_lightning.data.files import IMAGE_EXTENSIONS, list_images
        from tl_lightning.data.report import drop_unreadable, warn_unreadable

        if not os.path.isdir(self.predict_dir):
            raise TLError(f"predict_dir '{self.predict_dir}' is not a folder; point --data.predict_dir at a folder "
                          "of images.")
        paths = list_images(self.predict_dir)
        if not paths:
            raise TLError(f"no images under predict_dir '{self.predict_dir}' (looked for "
                          f"{', '.join(IMAGE_EXTENSIONS)}); point --data.predict_dir at a folder of images.")
        targets = -np.ones((len(paths), self.num_classes) if self.multilabel else len(paths), dtype=np.int64)
        dataset = SampleSet(FileSource(paths, targets), transform=self.eval_transform())
        kept, bad = drop_unreadable(dataset, self.bad_images, self.cache_dir)
        if bad:
            warn_unreadable(bad, "predict_dir")
        return kept

    def split_dataset(self, split: str, deterministic: bool = False) -> SampleSet:
        """The :class:`SampleSet` of ``split``; ``deterministic`` swaps training augmentation for eval transforms."""
        if split == "predict" and self.predict_dir:
            return self.predict_dataset()
        if not self.splits:
            self.setup()
        if split == "predict":
            split = "test"
        ds = self.splits[split]
        return ds.with_transform(self.eval_transform()) if deterministic else ds

    @property
    def deterministic_train(self) -> bool:
        """True when the training split's inputs are the same every epoch (features can be cached)."""
        return not self.augment

    # ----- loaders -----------------------------------------------------------------------------------------
    def make_loader(self, dataset: Dataset, shuffle: bool, batch_size: Optional[int] = None) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=shuffle, num_workers=workers,
            persistent_workers=self.persistent_workers and workers > 0,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
        )

    def feature_matrices(self, split: str) -> dict:
        """The served features of ``split``'s deterministic view: ``{read-out: [N, D], 'targets': [N, ...]}``,
        averaged over the requested views (``serve_features``); what a full-batch head is fitted on."""
        if self.served_features is None:
            raise TLError(f"{self.__class__.__name__} serves images, not features: serve_features is not set (the "
                          "CLI sets it for FeatureExtraction; in Python pass FeatureExtraction.served_features(...)).")
        return self.served_features.matrices(split, self.split_dataset(split, deterministic=True),
                                             self.make_loader, self.trainer)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        served = self.served_features is not None and split != "predict" and (
            split != "train" or self.deterministic_train)  # augmented training and predict keep their images
        if served:
            return self.served_features.loader(self.feature_matrices(split), self.batch_size, shuffle)
        return self.make_loader(self.split_dataset(split), shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)

    def fingerprint(self, split: str) -> str:
        return f"{self.__class__.__name__}:{split}:{self.split_dataset(split, deterministic=True).fingerprint()}"
