"""MNIST-M (Ganin & Lempitsky, 2015, "Unsupervised Domain Adaptation by Backpropagation"): MNIST digits blended
into patches of BSDS500 photographs, 32x32 RGB; 59,001 train / 9,001 test in the original release.

On-disk contract: the original ``mnist_m.tar.gz`` layout - ``mnist_m_train/NNNNNNNN.png`` with
``mnist_m_train_labels.txt`` (lines ``00000000.png 5``) and, optionally, ``mnist_m_test/*.png`` with
``mnist_m_test_labels.txt``; ``data_dir`` is the ``mnist_m`` folder or the folder that holds it. Get
``mnist_m.tar.gz`` from the DANN project page http://yaroslav.ganin.net/ (no torchvision downloader exists).

Splits: the official test split when ``mnist_m_test`` is present, else test (``test_fraction``) is carved out of
train; validation is always carved out of train (``val_fraction``, stratified, ``seed``). Metric: accuracy.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from tl_lightning.data.base import FileSource, Source, TLDataModule
from tl_lightning.data.digits import DIGIT_CLASSES
from tl_lightning.data.mnist import DigitImages
from tl_lightning.data.ondisk import Contract

FOLDER = "mnist_m"
CONTRACT = Contract(
    name="MNIST-M",
    expected="mnist_m_train/*.png with mnist_m_train_labels.txt (lines '00000000.png 5'; mnist_m_test/ and "
             "mnist_m_test_labels.txt optional)",
    url="the original mnist_m.tar.gz of Ganin & Lempitsky (http://yaroslav.ganin.net/)",
)


def _has_split(root: str, split: str) -> bool:
    return os.path.isdir(os.path.join(root, f"mnist_m_{split}")) and os.path.isfile(
        os.path.join(root, f"mnist_m_{split}_labels.txt"))


def read_labels(path: str) -> tuple[list[str], np.ndarray]:
    """``mnist_m_<split>_labels.txt``: file names and digit labels, in file order."""
    names, labels = [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                names.append(parts[0])
                labels.append(int(parts[1]))
    return names, np.array(labels, dtype=np.int64)


class MNISTMDataModule(DigitImages, TLDataModule):
    """MNIST-M from its original release; validation (and test, when ``mnist_m_test`` is absent) carved from train."""

    @property
    def classes(self) -> list[str]:
        return DIGIT_CLASSES

    def root(self) -> str:
        return CONTRACT.find_root(self.data_dir, (".", FOLDER), lambda p: _has_split(p, "train"))

    def prepare_data(self) -> None:
        self.root()

    def build_split(self, split: str) -> Optional[Source]:
        root = self.root()
        if split == "val" or not _has_split(root, split):
            return None
        names, labels = read_labels(os.path.join(root, f"mnist_m_{split}_labels.txt"))
        if not names:
            raise CONTRACT.missing(root, f"mnist_m_{split}_labels.txt lists no images")
        paths = [os.path.join(root, f"mnist_m_{split}", n) for n in names]
        CONTRACT.require_files(root, paths)
        return FileSource(paths, labels)
