"""scikit-learn's ``digits``: 1,797 real 8x8 handwritten digits (UCI optdigits test set) that ship with
scikit-learn, so this DataModule works offline with nothing on disk.

On-disk contract: none (``sklearn.datasets.load_digits``). Images are upscaled to the backbone's input size
and given as 3 channels. There is no official split: test (``test_fraction``) and validation
(``val_fraction``) are carved out of the 1,797 images, stratified, with ``seed``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from tl_lightning.data.base import ArraySource, Source, TLDataModule

DIGIT_CLASSES = [str(i) for i in range(10)]


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 (N, 8, 8) images in [0, 255] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


class DigitsDataModule(TLDataModule):
    """scikit-learn digits as 3-channel images at the backbone's resolution (the offline default data)."""

    hflip = 0.0
    augment_scale = (0.7, 1.0)
    crop_pct = 1.0

    @property
    def classes(self) -> list[str]:
        return DIGIT_CLASSES

    def build_split(self, split: str) -> Optional[Source]:
        if split != "train":
            return None
        images, labels = load_digit_images()
        return ArraySource(images, labels, name="sklearn-digits")
