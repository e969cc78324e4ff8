"""MNIST (LeCun, Cortes & Burges): 60,000 train / 10,000 test 28x28 grayscale digits, read by torchvision.

On-disk contract: the four official files ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (idx format; decompressed copies without
``.gz`` work too) in ``<data_dir>/raw/`` - torchvision's ``MNIST/raw/`` layout; ``data_dir`` may also be the
``raw`` folder itself or the parent of ``MNIST/``. Get them from https://yann.lecun.com/exdb/mnist/ or with
``download: true`` (torchvision's mirrors, into ``<data_dir>/MNIST/raw``).

torchvision reads the decompressed files; they are unpacked next to the ``.gz`` files, or into this
DataModule's own cache (``cache_dir``) when the data folder is read-only. Splits: the official train and test
sets; validation is carved out of train (``val_fraction``, stratified, ``seed``). Digits are given as 3 channels.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

from tl_lightning.data.base import ArraySource, Source, TLDataModule
from tl_lightning.data.digits import DIGIT_CLASSES
from tl_lightning.data.ondisk import Contract, gunzip, is_writable_dir
from tl_lightning.errors import TLError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
CONTRACT = Contract(
    name="MNIST",
    expected="raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (the four official idx files, torchvision's "
             "MNIST/raw layout)",
    url="https://yann.lecun.com/exdb/mnist/",
    downloadable=True,
)


class DigitImages:
    """Transform settings shared by digit data sets: no horizontal flips, gentle crops, the whole digit at eval."""

    hflip = 0.0
    augment_scale = (0.7, 1.0)
    crop_pct = 1.0


def _has_file(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, name)) or os.path.isfile(os.path.join(folder, name + ".gz"))


def _is_raw_folder(folder: str) -> bool:
    return all(_has_file(folder, name) for name in MNIST_FILES)


class MNISTDataModule(DigitImages, TLDataModule):
    """MNIST via ``torchvision.datasets.MNIST`` (official train/test; validation carved out of train)."""

    def __init__(self, download: bool = False, **kwargs):
        """
        Args:
            download: fetch the four files with torchvision into ``<data_dir>/MNIST/raw`` when they are missing.
            **kwargs: the common options of :class:`~tl_lightning.data.base.TLDataModule`.
        """
        super().__init__(**kwargs)
        self.download = download
        self._arrays: dict[bool, tuple] = {}

    @property
    def classes(self) -> list[str]:
        return DIGIT_CLASSES

    def prepare_data(self) -> None:
        self.raw_folder()

    def raw_folder(self) -> str:
        """The folder that holds the four files (downloading them first when asked to)."""
        candidates = (".", "raw", os.path.join("MNIST", "raw"))
        data_dir = CONTRACT.data_dir(self.data_dir)
        if self.download and not any(_is_raw_folder(os.path.join(data_dir, c)) for c in candidates):
            from torchvision.datasets import MNIST

            CONTRACT.download(lambda: MNIST(data_dir, train=True, download=True), data_dir)
        return CONTRACT.find_root(data_dir, candidates, _is_raw_folder)

    def torchvision_root(self) -> str:
        """A root whose ``MNIST/raw`` holds the decompressed files, unpacking them first where needed."""
        raw = self.raw_folder()
        in_layout = os.path.basename(raw) == "raw" and os.path.basename(os.path.dirname(raw)) == "MNIST"
        if in_layout and all(os.path.isfile(os.path.join(raw, n)) for n in MNIST_FILES):
            return os.path.dirname(os.path.dirname(raw))
        if in_layout and is_writable_dir(raw):
            target = raw
        else:  # read-only data folder (or another layout): unpack into our own cache
            tag = hashlib.sha1(os.path.abspath(raw).encode()).hexdigest()[:12]
            target = os.path.join(self.cache_dir, "mnist", tag, "MNIST", "raw")
            os.makedirs(target, exist_ok=True)
        for name in MNIST_FILES:
            dst = os.path.join(target, name)
            if os.path.isfile(dst):
                continue
            if os.path.isfile(os.path.join(raw, name)):
                try:
                    os.symlink(os.path.abspath(os.path.join(raw, name)), dst)
                except FileExistsError:  # another process linked it first
                    pass
            else:
                gunzip(os.path.join(raw, name + ".gz"), dst)
        return os.path.dirname(os.path.dirname(target))

    def arrays(self, train: bool):
        """(uint8 images (N, 28, 28), int64 labels) of the official train or test set."""
        if train not in self._arrays:
            from torchvision.datasets import MNIST

            root = self.torchvision_root()
            try:
                ds = MNIST(root, train=train)
            except (RuntimeError, TypeError, ValueError, AssertionError) as e:
                raise TLError(f"cannot read MNIST idx files under '{os.path.join(root, 'MNIST', 'raw')}' "
                              f"({e.__class__.__name__}: {e}); replace them with the official files.") from e
            self._arrays[train] = (ds.data.numpy(), ds.targets.numpy())
        return self._arrays[train]

    def build_split(self, split: str) -> Optional[Source]:
        if split == "val":
            return None
        images, labels = self.arrays(train=split == "train")
        return ArraySource(images, labels, name=f"mnist-{split}")
