"""CUB-200-2011 (Wah, Branson, Welinder, Perona & Belongie, 2011): 11,788 photographs of 200 bird species.

On-disk contract: the official ``CUB_200_2011/`` layout - ``images/NNN.Name/*.jpg``, ``images.txt``
(``<image id> <path under images/>``), ``image_class_labels.txt`` (``<image id> <class id>``),
``train_test_split.txt`` (``<image id> <1 = train, 0 = test>``), ``classes.txt`` (``<class id> NNN.Name``) and,
for ``crop_to_bbox: true``, ``bounding_boxes.txt`` (``<image id> <x> <y> <width> <height>``); ``data_dir`` is
``CUB_200_2011/`` or the folder that holds it. Get ``CUB_200_2011.tgz`` from
https://www.vision.caltech.edu/datasets/cub_200_2011/ or use ``download: true``.

Subsets work: the classes are those the metadata lists images for (e.g. the 10-class subset in
``../shared/data``), relabelled 0..C-1 in class-id order and named from ``classes.txt`` (without the ``NNN.``
prefix). Splits: the official train/test split; validation is carved out of train (``val_fraction``,
stratified, ``seed``). The metric is accuracy.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np

from tl_lightning.data.base import FileSource, Source, TLDataModule
from tl_lightning.data.ondisk import Contract

FOLDER = "CUB_200_2011"
METADATA = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
URL = "https://data.caltech.edu/records/65de6-vzc38/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
CONTRACT = Contract(
    name="CUB-200-2011",
    expected="CUB_200_2011/{images/NNN.Name/*.jpg, images.txt, image_class_labels.txt, train_test_split.txt, "
             "classes.txt} (and bounding_boxes.txt for --data.crop_to_bbox=true)",
    url="https://www.vision.caltech.edu/datasets/cub_200_2011/",
    downloadable=True,
)


def _is_root(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "images")) and all(
        os.path.isfile(os.path.join(path, f)) for f in METADATA)


def read_table(path: str) -> dict[int, list[str]]:
    """A CUB metadata file: ``<id> <fields...>`` per line -> {id: fields}."""
    table = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts:
                table[int(parts[0])] = parts[1:]
    return table


class CUB200DataModule(TLDataModule):
    """CUB-200-2011 (or any subset of its classes) with the official train/test split and optional box crops."""

    def __init__(self, crop_to_bbox: bool = False, download: bool = False, **kwargs):
        """
        Args:
            crop_to_bbox: crop every image to its ``bounding_boxes.txt`` box before the transforms.
            download: fetch and unpack ``CUB_200_2011.tgz`` into ``data_dir`` (torchvision's downloader).
            **kwargs: the common options of :class:`~tl_lightning.data.base.TLDataModule`.
        """
        super().__init__(**kwargs)
        self.crop_to_bbox = crop_to_bbox
        self.download = download

    def prepare_data(self) -> None:
        self.root()

    def root(self) -> str:
        """The ``CUB_200_2011`` folder (downloaded and unpacked first when asked to)."""
        data_dir = CONTRACT.data_dir(self.data_dir)
        candidates = (".", FOLDER)
        if self.download and not any(_is_root(os.path.join(data_dir, c)) for c in candidates):
            from torchvision.datasets.utils import download_and_extract_archive

            CONTRACT.download(lambda: download_and_extract_archive(URL, data_dir, md5=MD5), data_dir)
        return CONTRACT.find_root(data_dir, candidates, _is_root)

    @functools.cached_property
    def metadata(self) -> dict:
        """Image paths, contiguous labels, train flags (and boxes) of every image listed, in image-id order."""
        root = self.root()
        tables = {name: read_table(os.path.join(root, name)) for name in METADATA}
        images, labels, split = tables["images.txt"], tables["image_class_labels.txt"], tables["train_test_split.txt"]
        ids = sorted(images)
        unlisted = [i for i in ids if i not in labels or i not in split]
        if unlisted:
            raise CONTRACT.missing(root, f"image id {unlisted[0]} of images.txt has no line in "
                                         "image_class_labels.txt or train_test_split.txt")
        class_ids = sorted({int(labels[i][0]) for i in ids})
        unnamed = [c for c in class_ids if c not in tables["classes.txt"]]
        if unnamed:
            raise CONTRACT.missing(root, f"class id {unnamed[0]} has no line in classes.txt")
        names = [tables["classes.txt"][c][0].split(".", 1)[-1] for c in class_ids]
        index = {c: k for k, c in enumerate(class_ids)}
        meta = {
            "classes": names,
            "paths": np.array([os.path.join(root, "images", images[i][0]) for i in ids]),
            "targets": np.array([index[int(labels[i][0])] for i in ids], dtype=np.int64),
            "is_train": np.array([split[i][0] == "1" for i in ids]),
            "boxes": None,
        }
        if self.crop_to_bbox:
            box_file = os.path.join(root, "bounding_boxes.txt")
            CONTRACT.require_files(root, [box_file])
            boxes = read_table(box_file)
            if any(i not in boxes for i in ids):
                raise CONTRACT.missing(root, "bounding_boxes.txt lacks a line for some image of images.txt")
            meta["boxes"] = np.array([[float(v) for v in boxes[i][:4]] for i in ids])
        CONTRACT.require_files(root, meta["paths"])
        return meta

    @property
    def classes(self) -> list[str]:
        return self.metadata["classes"]

    def build_split(self, split: str) -> Optional[Source]:
        if split == "val":
            return None
        meta = self.metadata
        keep = meta["is_train"] if split == "train" else ~meta["is_train"]
        boxes = meta["boxes"][keep] if meta["boxes"] is not None else None
        return FileSource(meta["paths"][keep].tolist(), meta["targets"][keep], crop_boxes=boxes)
