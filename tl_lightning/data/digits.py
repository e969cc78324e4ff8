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


# ----- MNIST-M-style target: the same digits blended into photographs -----------------------------------------
BLEND_SIZE = 32
#: natural photographs shipped inside scikit-image and scikit-learn (no download)
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def load_photographs() -> list[np.ndarray]:
    """RGB uint8 photographs bundled with scikit-image (``skimage.data``) and scikit-learn (sample images)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    photos += list(load_sample_images().images)
    return [np.ascontiguousarray(p[..., :3]).astype(np.uint8) for p in photos]


def blend_digits(digits: np.ndarray, photos: list[np.ndarray], seed: int, size: int = BLEND_SIZE) -> np.ndarray:
    """MNIST-M's recipe (Ganin & Lempitsky 2015): each digit, upscaled to ``size`` px, is blended into a random
    ``size`` x ``size`` patch of a random photograph as ``|digit - patch|`` per channel. Returns (N, size, size, 3)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((len(digits), size, size, 3), dtype=np.uint8)
    for i, digit in enumerate(digits):
        big = np.asarray(Image.fromarray(digit).resize((size, size), Image.BILINEAR), dtype=np.int16)
        photo = photos[rng.integers(len(photos))]
        y = rng.integers(photo.shape[0] - size + 1)
        x = rng.integers(photo.shape[1] - size + 1)
        patch = photo[y:y + size, x:x + size].astype(np.int16)
        out[i] = np.abs(big[..., None] - patch).astype(np.uint8)
    return out


class BlendedDigitsDataModule(DigitsDataModule):
    """scikit-learn digits blended into photograph patches, MNIST-M style: an offline target domain for
    adaptation from :class:`DigitsDataModule`. Same 1,797 digits, labels and carve-outs; 32 px RGB.

    Args:
        blend_seed: seed of the patch choice (fixed per data set, independent of the split ``seed``).
    """

    augment_scale = (0.8, 1.0)

    def __init__(self, *args, blend_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.blend_seed = blend_seed

    def build_split(self, split: str) -> Optional[Source]:
        if split != "train":
            return None
        digits, labels = load_digit_images()
        images = blend_digits(digits, load_photographs(), self.blend_seed)
        return ArraySource(images, labels, name=f"sklearn-digits-blended-{self.blend_seed}")
