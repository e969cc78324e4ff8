"""A labelled source domain paired with a target domain, for domain adaptation (Tzeng et al., ICCV 2015).

:class:`DomainPairDataModule` wraps two :class:`TLDataModule` (``class_path``/``init_args`` in a config, or
instances in Python). The target's training split is divided, with ``seed``, into ``labelled_per_class``
labelled samples per class (the semi-supervised setting; ``0`` = unsupervised, ``null`` = every target training
sample labelled, for the train-on-target baseline) and the unlabelled rest, whose labels are dropped.

Training batches are dicts ``{"source": (x, y), "target_labelled": (x, y), "target_unlabelled": x}`` (no
``target_labelled`` entry when ``labelled_per_class=0``), served by Lightning's ``CombinedLoader``.

Epoch definition (``epoch``): every stream is drawn at random without replacement, reshuffled each time it runs
out, and an epoch is the same number of steps for all streams: ``source`` = one pass over the source training
split, ``target`` = one pass over the unlabelled target, ``longest`` (default) = one pass over the larger of the
two, or an integer number of steps. The few labelled target samples are cycled (``labelled_batch_size`` per step,
at most all of them).

``in_memory: true`` decodes and transforms every deterministic split once, shared by every pair in the process
(fast for small images such as 32 px digits; training splits with augmentation are left as they are), and keeps
the images as uint8 (:class:`ByteImages`), normalised per sample exactly as the on-disk path does.

Validation and test run two loaders: target (``dataloader_idx`` 0) then source (1), so a method reports
target and source accuracy separately.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Union

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from tl_lightning.backbones import DEFAULT_BACKBONE
from tl_lightning.data.base import SampleSet, TLDataModule, check_batch_size, default_num_workers, per_class_subset
from tl_lightning.data.in_memory import ByteImages, ImagesOnly, decoded, held_in_memory  # noqa: F401
from tl_lightning.data.served_features import images_only
from tl_lightning.errors import TLError
from tl_lightning.instantiate import instantiate

#: order of the validation/test loaders
EVAL_DOMAINS = ("target", "source")
EPOCH_DEFINITIONS = ("source", "target", "longest")


def build_datamodule(spec: Union[TLDataModule, dict]) -> TLDataModule:
    """A DataModule from an instance or a ``{"class_path": ..., "init_args": {...}}`` dict."""
    if isinstance(spec, TLDataModule):
        return spec
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise TLError("source and target must each be a TLDataModule or {class_path, init_args}; fix the data config.")
    return instantiate(spec, TLDataModule, "a DataModule", "check its class_path and init_args.")


class DomainPairDataModule(L.LightningDataModule):
    """Source/target pair (see module docstring for batches, epoch definition and evaluation loaders)."""

    def __init__(
        self,
        source: TLDataModule,
        target: TLDataModule,
        labelled_per_class: Optional[int] = 0,
        seed: int = 0,
        batch_size: int = 64,
        labelled_batch_size: Optional[int] = None,
        epoch: Union[Literal["source", "target", "longest"], int] = "longest",
        num_workers: Optional[int] = None,
        backbone: str = DEFAULT_BACKBONE,
        image_size: Optional[int] = None,
        in_memory: bool = False,
        serve_features: Optional[dict] = None,
    ):
        """
        Args:
            source: labelled source DataModule (``class_path``/``init_args``).
            target: target DataModule; its training labels are used only for the ``labelled_per_class`` samples.
            labelled_per_class: labelled target samples per class (k); 0 = unsupervised, null = all labelled.
            seed: seed of the choice of the k labelled target samples.
            batch_size: source and unlabelled-target samples per step (each), and the evaluation batch size.
            labelled_batch_size: labelled-target samples per step; default ``batch_size`` (at most all of them).
            epoch: steps per epoch: ``source``, ``target`` (unlabelled), ``longest``, or an integer.
            num_workers: loader processes; default half the cores (at most 8), and none for a split held in
                memory (``in_memory``: nothing to decode, and each worker would hold its own pages).
            backbone: timm model whose input size and normalisation both domains use (linked from the model).
            image_size: override the backbone's input size in both domains.
            in_memory: hold every deterministic split as decoded tensors (small images only).
            serve_features: linked by the CLI for every DataModule; must stay null for a domain pair.
        """
        super().__init__()
        images_only(serve_features, self.__class__.__name__)
        check_batch_size(batch_size)
        if labelled_batch_size is not None:
            check_batch_size(labelled_batch_size, "--data.labelled_batch_size")
        if labelled_per_class is not None and labelled_per_class < 0:
            raise TLError("labelled_per_class must be >= 0 (0 = unsupervised) or null (all target labels); "
                          "fix --data.init_args.labelled_per_class.")
        if isinstance(epoch, str) and epoch not in EPOCH_DEFINITIONS or isinstance(epoch, int) and epoch < 1:
            raise TLError(f"epoch must be one of {', '.join(EPOCH_DEFINITIONS)} or a positive number of steps; "
                          f"got {epoch!r}.")
        self.source = build_datamodule(source)
        self.target = build_datamodule(target)
        self.labelled_per_class = labelled_per_class
        self.seed = seed
        self.batch_size = batch_size
        self.labelled_batch_size = labelled_batch_size or batch_size
        self.epoch = epoch
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.workers_chosen = num_workers is not None
        self.backbone = backbone
        self.image_size = image_size
        self.in_memory = in_memory
        for child in (self.source, self.target):
            if child.splits and (child.backbone != backbone or image_size and child.image_size != image_size):
                child.splits = {}  # transforms follow the backbone: rebuild them
            child.backbone = backbone
            if image_size:
                child.image_size = image_size
        self.splits: dict[str, Dataset] = {}

    # ----- task facts, linked into the model by the CLI -------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.source.class_names

    @property
    def multilabel(self) -> bool:
        return self.source.multilabel

    # ----- splits ------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.source.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        self.source.setup(stage)
        self.target.setup(stage)
        if self.source.num_classes != self.target.num_classes or self.source.multilabel != self.target.multilabel:
            raise TLError(f"source ({self.source.num_classes} classes) and target ({self.target.num_classes} "
                          "classes) must share one label space; pick matching data sets.")
        target_train = self.target.split_dataset("train")
        target = self._served(target_train, self.target.deterministic_train)
        splits = {"source_train": self._served(self.source.split_dataset("train"), self.source.deterministic_train)}
        k = self.labelled_per_class
        if k is None:
            splits["target_labelled"] = target
            splits["target_unlabelled"] = ImagesOnly(target)
        elif k == 0:
            splits["target_unlabelled"] = ImagesOnly(target)
        else:
            self._check_labelled_per_class(target_train.targets, k)
            labelled = per_class_subset(target_train.targets, k, self.seed)
            rest = np.setdiff1d(np.arange(len(target_train)), labelled)
            if isinstance(target, (TensorDataset, ByteImages)):  # decoded once, shared by every k and seed
                splits["target_labelled"] = Subset(target, labelled.tolist())
                splits["target_unlabelled"] = ImagesOnly(Subset(target, rest.tolist()))
            else:
                splits["target_labelled"] = target_train.subset(labelled)
                splits["target_unlabelled"] = ImagesOnly(target_train.subset(rest))
        self.splits = splits

    def _check_labelled_per_class(self, targets: np.ndarray, k: int) -> None:
        """Stop when k labels every target sample; warn for each class that has fewer than k."""
        if targets.ndim > 1:
            return
        classes, counts = np.unique(targets, return_counts=True)
        if k >= counts.max():
            raise TLError(f"labelled_per_class={k} labels every target training sample (the largest class has "
                          f"{counts.max()}), which leaves no unlabelled target data; use a value below "
                          f"{counts.max()}, or null to train on all target labels.")
        names = list(getattr(self.target, "class_names", None) or [])
        for c, n in zip(classes, counts):
            if n < k:
                name = names[int(c)] if int(c) < len(names) else str(c)
                warnings.warn(f"labelled_per_class={k}: target class '{name}' has only {n} training samples, so it "
                              f"gets {n} labelled samples and no unlabelled ones.", stacklevel=2)

    def _served(self, samples: SampleSet, deterministic: bool = True) -> Dataset:
        return decoded(samples) if self.in_memory and deterministic else samples

    @property
    def has_labelled_target(self) -> bool:
        self.setup()
        return "target_labelled" in self.splits

    def sizes(self) -> dict[str, int]:
        """Number of samples in every stream and evaluation split (for logs and ``metrics.json``)."""
        self.setup()
        out = {name: len(ds) for name, ds in self.splits.items()}
        for domain, child in (("source", self.source), ("target", self.target)):
            for split in ("val", "test"):
                out[f"{domain}_{split}"] = len(child.split_dataset(split))
        out["steps_per_epoch"] = self.steps_per_epoch()
        return out

    def steps_per_epoch(self) -> int:
        self.setup()
        if isinstance(self.epoch, int):
            return self.epoch
        n_source = math.ceil(len(self.splits["source_train"]) / self.batch_size)
        n_target = math.ceil(len(self.splits["target_unlabelled"]) / self.batch_size)
        return {"source": n_source, "target": n_target, "longest": max(n_source, n_target)}[self.epoch]

    # ----- loaders -----------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, steps: Optional[int] = None, shuffle: bool = False):
        sampler = RandomSampler(dataset, num_samples=steps * batch_size) if steps else None
        workers = 0 if held_in_memory(dataset) and not self.workers_chosen else self.num_workers
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle if sampler is None else None,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> CombinedLoader:
        steps = self.steps_per_epoch()
        streams = {"source": self._loader(self.splits["source_train"], self.batch_size, steps)}
        if "target_labelled" in self.splits:
            labelled = self.splits["target_labelled"]
            streams["target_labelled"] = self._loader(labelled, min(self.labelled_batch_size, len(labelled)), steps)
        streams["target_unlabelled"] = self._loader(self.splits["target_unlabelled"], self.batch_size, steps)
        return CombinedLoader(streams, mode="min_size")

    def source_loader(self) -> DataLoader:
        """The source training split in order, with deterministic transforms: for scoring it (soft labels)."""
        self.setup()
        return self._loader(self._served(self.source.split_dataset("train", deterministic=True)), self.batch_size)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        self.setup()
        children = {"target": self.target, "source": self.source}
        return [self._loader(self._served(children[d].split_dataset(split)), self.batch_size) for d in EVAL_DOMAINS]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.target.split_dataset("test"), self.batch_size)
