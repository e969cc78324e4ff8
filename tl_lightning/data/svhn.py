"""SVHN (Netzer et al., 2011), cropped digits: 73,257 train / 26,032 test (+ 531,131 extra) 32x32 RGB images.

On-disk contract: ``train_32x32.mat`` and ``test_32x32.mat`` (and ``extra_32x32.mat`` with ``extra: true``)
directly in ``data_dir`` (torchvision's ``SVHN`` root). Each is a MATLAB file with ``X`` (32, 32, 3, N) uint8
and ``y`` (N, 1), where label 10 stands for digit 0. Get them from http://ufldl.stanford.edu/housenumbers/ or
with ``download: true`` (torchvision downloads them and checks their MD5s). The files are read with
``scipy.io.loadmat`` and checked for their shapes and labels.

Label 10 is mapped to 0. Splits: the official train (plus ``extra`` when asked for) and test sets; validation
is carved out of train (``val_fraction``, stratified, ``seed``).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from tl_lightning.data.base import ArraySource, Source, TLDataModule
from tl_lightning.data.digits import DIGIT_CLASSES
from tl_lightning.data.mnist import DigitImages
from tl_lightning.data.ondisk import Contract
from tl_lightning.errors import TLError

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
CONTRACT = Contract(
    name="SVHN",
    expected="train_32x32.mat and test_32x32.mat (extra_32x32.mat with --data.extra=true; MATLAB files with "
             "X (32,32,3,N) uint8 and y (N,1))",
    url="http://ufldl.stanford.edu/housenumbers/",
    downloadable=True,
)


class SVHNDataModule(DigitImages, TLDataModule):
    """SVHN cropped digits (label 10 -> 0; optional ``extra`` training set)."""

    def __init__(self, extra: bool = False, download: bool = False, **kwargs):
        """
        Args:
            extra: add the 531,131 ``extra`` images to the training set.
            download: fetch missing files with torchvision into ``data_dir``.
            **kwargs: the common options of :class:`~tl_lightning.data.base.TLDataModule`.
        """
        super().__init__(**kwargs)
        self.extra = extra
        self.download = download

    @property
    def classes(self) -> list[str]:
        return DIGIT_CLASSES

    def needed_parts(self) -> tuple[str, ...]:
        return ("train", "test", "extra") if self.extra else ("train", "test")

    def prepare_data(self) -> None:
        self.root()

    def root(self) -> str:
        """``data_dir`` once every needed file is there (downloaded first when asked to)."""
        root = CONTRACT.data_dir(self.data_dir)
        missing = [p for p in self.needed_parts() if not os.path.isfile(os.path.join(root, SVHN_FILES[p]))]
        if missing and self.download:
            from torchvision.datasets import SVHN

            for part in missing:
                CONTRACT.download(lambda: SVHN(root, split=part, download=True), root)
        CONTRACT.require_files(root, [os.path.join(root, SVHN_FILES[p]) for p in self.needed_parts()])
        return root

    def load_part(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (N, 32, 32, 3), labels in 0..9) of one official file."""
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        path = os.path.join(self.root(), SVHN_FILES[part])
        try:
            mat = loadmat(path)
            images, labels = mat["X"], np.asarray(mat["y"]).ravel()
        except (MatReadError, OSError, ValueError, KeyError, TypeError) as e:
            raise TLError(f"cannot read '{path}' ({e.__class__.__name__}: {' '.join(str(e).split())}); replace it "
                          "with the official file.") from e
        if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels) \
                or images.dtype != np.uint8 or not np.isin(labels, np.arange(1, 11)).all():
            raise TLError(f"'{path}' is not an SVHN file: X must be (32, 32, 3, N) uint8 and y (N, 1) in 1..10, got X "
                          f"{images.shape} {images.dtype} and {len(labels)} labels; replace it with the official file.")
        return np.ascontiguousarray(images.transpose(3, 0, 1, 2)), (labels % 10).astype(np.int64)

    def build_split(self, split: str) -> Optional[Source]:
        if split == "val":
            return None
        parts = [p for p in ("train", "extra") if p in self.needed_parts()] if split == "train" else ["test"]
        loaded = [self.load_part(p) for p in parts]
        if len(loaded) == 1:
            images, labels = loaded[0]
        else:
            images = np.concatenate([im for im, _ in loaded])
            labels = np.concatenate([lb for _, lb in loaded])
        return ArraySource(images, labels, name=f"svhn-{'+'.join(parts)}")
