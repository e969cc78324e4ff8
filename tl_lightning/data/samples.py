"""Samples and splits: where a data set's images come from (:class:`Source`: image files or an in-memory array),
the view a split serves (:class:`SampleSet`: indices and a transform over a source, with ``targets``), and how
splits and low-data subsets are drawn (stratified, seeded).
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tl_lightning.errors import TLError


def open_image(path: str) -> Image.Image:
    """Decode an image file as RGB, naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:
        raise TLError(f"cannot decode image '{path}' ({e.__class__.__name__}: {e}); replace or remove the file.") from e


class Source:
    """Raw samples of one split: ``load(i)`` returns a PIL image, ``targets`` holds the labels."""

    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def identity(self) -> str:
        """A string that changes whenever the samples change (used in cache keys)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable reference to a sample (a path where there is one)."""
        return f"#{index}"


class FileSource(Source):
    """Samples stored as image files."""

    def __init__(self, paths: Sequence[str], targets, crop_boxes: Optional[Sequence] = None):
        self.paths = list(paths)
        self.targets = np.asarray(targets)
        self.crop_boxes = crop_boxes

    def load(self, index: int) -> Image.Image:
        img = open_image(self.paths[index])
        if self.crop_boxes is not None:
            x, y, w, h = self.crop_boxes[index]
            img = img.crop((int(x), int(y), int(x + w), int(y + h)))
        return img

    def identity(self) -> str:
        h = hashlib.sha1()
        for p in self.paths:  # a replaced or edited image changes its size or modification time
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:
                h.update(f"{p}\0missing\0".encode())
        h.update(self.targets.tobytes())
        if self.crop_boxes is not None:
            h.update(np.ascontiguousarray(self.crop_boxes, dtype=np.float64).tobytes())
        return h.hexdigest()

    def describe(self, index: int) -> str:
        return self.paths[index]


class ArraySource(Source):
    """Samples held in memory as a uint8 array, (N, H, W) grayscale or (N, H, W, 3) RGB."""

    def __init__(self, images: np.ndarray, targets, name: str):
        self.images = images
        self.targets = np.asarray(targets)
        self.name = name

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")

    def identity(self) -> str:
        h = hashlib.sha1(self.name.encode())
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())  # every image, not a sample of them
        h.update(self.targets.tobytes())
        return h.hexdigest()


class SampleSet(Dataset):
    """A view of a :class:`Source`: which samples (``indices``) and how they are transformed."""

    def __init__(self, source: Source, indices: Optional[np.ndarray] = None, transform: Optional[Callable] = None):
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform

    @property
    def targets(self) -> np.ndarray:
        return self.source.targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = self.source.load(int(self.indices[i]))
        x = self.transform(img) if self.transform is not None else img
        y = self.source.targets[self.indices[i]]
        y = torch.as_tensor(y, dtype=torch.float32 if np.ndim(y) else torch.long)
        return x, y

    def subset(self, positions) -> "SampleSet":
        return SampleSet(self.source, self.indices[np.asarray(positions, dtype=np.int64)], self.transform)

    def with_transform(self, transform: Optional[Callable]) -> "SampleSet":
        return SampleSet(self.source, self.indices, transform)

    def describe(self, i: int) -> str:
        return self.source.describe(int(self.indices[i]))

    def fingerprint(self) -> str:
        h = hashlib.sha1(self.source.identity().encode())
        h.update(self.indices.tobytes())
        h.update(repr(self.transform).encode())
        return h.hexdigest()


def check_batch_size(batch_size: int, option: str = "--data.batch_size") -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TLError(f"{option} must be a positive number of samples per batch, got {batch_size}; e.g. {option}=64.")


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (keep, carved): ``fraction`` of each class carved out (at least one where a class has two+)."""
    rng = np.random.default_rng(seed)
    if targets.ndim > 1:  # multi-label: plain random split
        perm = rng.permutation(len(targets))
        n = int(round(fraction * len(targets)))
        return np.sort(perm[n:]), np.sort(perm[:n])
    keep, carved = [], []
    for c in np.unique(targets):
        pos = rng.permutation(np.flatnonzero(targets == c))
        n = int(round(fraction * len(pos)))
        if fraction > 0 and n == 0 and len(pos) > 1:
            n = 1
        carved.append(pos[:n])
        keep.append(pos[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(carved))


def per_class_subset(targets: np.ndarray, samples_per_class: int, seed: int) -> np.ndarray:
    """Positions of at most ``samples_per_class`` samples of each class, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    if targets.ndim > 1:
        chosen = set()
        for c in range(targets.shape[1]):
            pos = rng.permutation(np.flatnonzero(targets[:, c] == 1))
            chosen.update(pos[:samples_per_class].tolist())
        return np.array(sorted(chosen), dtype=np.int64)
    out = [rng.permutation(np.flatnonzero(targets == c))[:samples_per_class] for c in np.unique(targets)]
    return np.sort(np.concatenate(out))
