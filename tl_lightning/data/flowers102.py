"""Oxford Flowers102 (Nilsback & Zisserman, 2008): 8,189 photographs of 102 flower species, read by torchvision.

On-disk contract: ``flowers-102/`` (torchvision's ``Flowers102`` layout) holding ``jpg/image_%05d.jpg``
(1-based ids), ``imagelabels.mat`` (key ``labels``: 1-based class of each image) and ``setid.mat`` (keys
``trnid``, ``valid``, ``tstid``: image ids of each split); ``data_dir`` is the folder that holds
``flowers-102/`` or ``flowers-102/`` itself. Get ``102flowers.tgz``, ``imagelabels.mat`` and ``setid.mat`` from
https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ or use ``download: true`` (torchvision downloads them and
checks their MD5s). The ``.mat`` files are read with ``scipy.io.loadmat``.

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


SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def read_split(folder: str, split: str) -> FileSource:
    """The images and 0-based classes of an official split, from ``imagelabels.mat`` and ``setid.mat`` in
    ``folder`` (``flowers-102/``)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        labels = loadmat(os.path.join(folder, "imagelabels.mat"))["labels"].ravel().astype(int)
        ids = loadmat(os.path.join(folder, "setid.mat"))[SPLIT_KEYS[split]].ravel().astype(int)
    except (MatReadError, OSError, ValueError, KeyError, TypeError) as e:
        raise TLError(f"cannot read the Flowers102 metadata in '{folder}' ({e.__class__.__name__}: "
                      f"{' '.join(str(e).split())}); replace imagelabels.mat and setid.mat with the official "
                      "files.") from e
    if len(ids) and (ids.min() < 1 or ids.max() > len(labels)) or (len(labels) and labels.min() < 1):
        raise TLError(f"setid.mat or imagelabels.mat in '{folder}' do not match (image ids must be 1..{len(labels)} "
                      "and classes 1-based); replace them with the official files.")
    paths = [os.path.join(folder, "jpg", f"image_{i:05d}.jpg") for i in ids]
    return FileSource(paths, (labels[ids - 1] - 1).tolist())


class Flowers102DataModule(TLDataModule):
    """Flowers102 with the official train/val/test split (``setid.mat``)."""

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
        folder = os.path.join(self.root(), FOLDER)
        source = read_split(folder, split)
        CONTRACT.require_files(folder, source.paths)
        return source
