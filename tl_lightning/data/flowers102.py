"""Oxford Flowers102 (Nilsback & Zisserman, 2008): 8,189 photographs of 102 flower species, read by torchvision.

On-disk contract: ``flowers-102/`` (torchvision's ``Flowers102`` layout) holding ``jpg/image_%05d.jpg``
(1-based ids), ``imagelabels.mat`` (key ``labels``: 1-based class of each image) and ``setid.mat`` (keys
``trnid``, ``valid``, ``tstid``: image ids of each split); ``data_dir`` is the folder that holds
``flowers-102/`` or ``flowers-102/`` itself. Get ``102flowers.tgz``, ``imagelabels.mat`` and ``setid.mat`` from
https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ or use ``download: true``. torchvision checks the MD5 of
the two ``.mat`` files.

Splits: the official ones from ``setid.mat``: 1,020 train / 1,020 val / 6,149 test (10 + 10 images per
class to train and validate on; the rest is the test set). The metric is accuracy.
"""
from __future__ import annotations

import os
from typing import Optional

from tl_lightning.data.base import FileSource, Source, TLDataModule
from tl_lightning.data.ondisk import Contract
from tl_lightning.errors import TLError

FOLDER = "flowers-102"
CONTRACT = Contract(
    name="Oxford Flowers102",
    expected="flowers-102/jpg/image_%05d.jpg, flowers-102/imagelabels.mat (key labels) and flowers-102/setid.mat "
             "(keys trnid, valid, tstid)",
    url="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    downloadable=True,
)


def _is_root(path: str) -> bool:
    folder = os.path.join(path, FOLDER)
    return all(os.path.exists(os.path.join(folder, f)) for f in ("jpg", "imagelabels.mat", "setid.mat"))


class Flowers102DataModule(TLDataModule):
    """Flowers102 via ``torchvision.datasets.Flowers102`` with the official train/val/test split."""

    def __init__(self, download: bool = False, **kwargs):
        """
        Args:
            download: fetch the images and ``.mat`` files with torchvision into ``<data_dir>/flowers-102``.
            **kwargs: the common options of :class:`~tl_lightning.data.base.TLDataModule`.
        """
        super().__init__(**kwargs)
        self.download = download

    @property
    def classes(self) -> list[str]:
        from torchvision.datasets import Flowers102

        return list(Flowers102.classes)

    def prepare_data(self) -> None:
        self.root()

    def root(self) -> str:
        """torchvision's root: the folder that holds ``flowers-102/`` (downloaded first when asked to)."""
        data_dir = CONTRACT.data_dir(self.data_dir)
        candidates = (".", "..") if os.path.basename(os.path.normpath(data_dir)) == FOLDER else (".",)
        if self.download and not any(_is_root(os.path.join(data_dir, c)) for c in candidates):
            from torchvision.datasets import Flowers102

            CONTRACT.download(lambda: Flowers102(data_dir, download=True), data_dir)
        return CONTRACT.find_root(data_dir, candidates, _is_root)

    def build_split(self, split: str) -> Optional[Source]:
        from torchvision.datasets import Flowers102

        root = self.root()
        try:
            ds = Flowers102(root, split=split)
        except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
            raise TLError(f"cannot read the Flowers102 metadata in '{os.path.join(root, FOLDER)}' "
                          f"({e.__class__.__name__}: {' '.join(str(e).split())}); replace imagelabels.mat and "
                          f"setid.mat with the official files.") from e
        paths = [str(p) for p in ds._image_files]
        CONTRACT.require_files(os.path.join(root, FOLDER), paths)
        return FileSource(paths, ds._labels)
