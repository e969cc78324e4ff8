"""Small images held in memory (``DomainPairDataModule(in_memory=True)``): a deterministic split decoded and
transformed once per process, kept as uint8 tensors (:class:`ByteImages`) and normalised per sample exactly as the
on-disk path does; :class:`ImagesOnly` drops the labels of a split (the unlabelled target).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import Compose, Normalize

from tl_lightning.data.samples import SampleSet

#: decoded splits of this process, by SampleSet fingerprint (``in_memory``)
_DECODED: dict[str, Dataset] = {}


class ByteImages(Dataset):
    """Decoded images kept as uint8 (a quarter of float32's memory, shared by fork-started loader workers without
    copies), each converted back at read time exactly as ``ToTensor`` and ``Normalize`` would have."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, normalize: Callable):
        self.images, self.targets, self.normalize = images, targets, normalize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.normalize(self.images[i].float().div(255)), self.targets[i]


def _split_normalize(transform) -> Optional[tuple[Callable, Callable]]:
    """``(everything before Normalize, Normalize)`` when ``transform`` is a Compose that ends in ToTensor and
    Normalize (so the images before Normalize are uint8 values / 255), else None."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], Normalize) or "ToTensor" not in type(steps[-2]).__name__:
        return None
    return Compose(steps[:-1]), steps[-1]


def _as_bytes(samples: SampleSet, before: Callable, normalize: Callable) -> Optional[ByteImages]:
    """``samples`` decoded batch by batch into uint8 (no full-size float copy), or None when a transformed image
    is not uint8 values / 255 after all."""
    images, targets = [], []
    for x, y in DataLoader(samples.with_transform(before), batch_size=512, num_workers=0):
        scaled = x.mul(255).round()
        if not torch.equal(scaled.div(255), x):
            return None
        images.append(scaled.to(torch.uint8))
        targets.append(y)
    return ByteImages(torch.cat(images), torch.cat(targets), normalize)


def decoded(samples: SampleSet) -> Dataset:
    """``samples`` decoded and transformed once into tensors (memoised by fingerprint in this process): as uint8
    images plus the normalisation when the transform ends in ToTensor + Normalize, else as float tensors."""
    key = samples.fingerprint()
    if key not in _DECODED:
        parts = _split_normalize(samples.transform)
        stored = _as_bytes(samples, *parts) if parts else None
        if stored is None:
            batches = list(DataLoader(samples, batch_size=512, num_workers=0))
            stored = TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        _DECODED[key] = stored
    return _DECODED[key]


class ImagesOnly(Dataset):
    """A dataset of ``(x, y)`` with its labels dropped (the unlabelled target)."""

    def __init__(self, samples: Dataset):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.samples[i][0]


def held_in_memory(dataset: Dataset) -> bool:
    """Whether ``dataset`` (or what a Subset / ImagesOnly wraps) is decoded tensors (``in_memory``)."""
    while isinstance(dataset, (Subset, ImagesOnly)):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.samples
    return isinstance(dataset, (ByteImages, TensorDataset))
