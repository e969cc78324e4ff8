"""PASCAL VOC 2007 (Everingham et al., 2010) as image classification: multi-label over its 20 object classes.

On-disk contract: the devkit layout ``VOCdevkit/VOC2007/`` with ``Annotations/<id>.xml`` (``<object>`` entries
with ``<name>`` and ``<difficult>``), ``ImageSets/Main/{train,val,trainval,test}.txt`` (one image id a line)
and ``JPEGImages/<id>.jpg``; ``data_dir`` is the folder that holds ``VOCdevkit/``, ``VOCdevkit/`` or
``VOC2007/`` itself. Get ``VOCtrainval_06-Nov-2007.tar`` and ``VOCtest_06-Nov-2007.tar`` from
http://host.robots.ox.ac.uk/pascal/VOC/voc2007/ (both unpack into ``VOCdevkit/VOC2007``) or use
``download: true`` (torchvision's URLs and MD5s).

Targets follow the devkit's classification ground truth: 1 when an image holds a non-difficult object of the
class, -1 (ignored in the loss and the metric) when it holds only ``difficult`` ones, 0 otherwise. Splits: the
devkit's ``train``/``val``/``test`` lists; with ``train_split: trainval`` the model trains on ``trainval`` and
validation is carved out of it. The metric is mAP: the VOC2007 11-point AP (``*/mAP_voc07``) and the
area-under-curve AP (``*/mAP``), see :mod:`tl_lightning.metrics`.
"""
from __future__ import annotations

import functools
import os
import xml.etree.ElementTree as ET
from typing import Literal, Optional

import numpy as np

from tl_lightning.data.base import FileSource, Source, TLDataModule
from tl_lightning.data.ondisk import Contract
from tl_lightning.errors import TLError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
DEVKIT = os.path.join("VOCdevkit", "VOC2007")
CONTRACT = Contract(
    name="PASCAL VOC 2007",
    expected="VOCdevkit/VOC2007/{Annotations/<id>.xml, ImageSets/Main/{train,val,trainval,test}.txt, "
             "JPEGImages/<id>.jpg} (from VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar)",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
    downloadable=True,
)


def _is_root(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, d)) for d in ("Annotations", "ImageSets", "JPEGImages"))


def read_targets(xml_path: str) -> np.ndarray:
    """The 20-vector of one annotation file: 1 present, -1 only ``difficult`` objects, 0 absent."""
    try:
        tree = ET.parse(xml_path)
    except (ET.ParseError, OSError) as e:
        raise TLError(f"cannot read VOC annotation '{xml_path}' ({e.__class__.__name__}: {e}); replace it with "
                      "the devkit's file.") from e
    target = np.zeros(len(VOC_CLASSES), dtype=np.float32)
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise TLError(f"VOC annotation '{xml_path}' names an unknown class '{name}'; the 20 VOC classes are "
                          f"{', '.join(VOC_CLASSES)}.")
        c = VOC_CLASSES.index(name)
        if int((obj.findtext("difficult") or "0").strip()) == 0:
            target[c] = 1.0
        elif target[c] == 0:
            target[c] = -1.0
    return target


class VOC2007DataModule(TLDataModule):
    """VOC 2007 multi-label classification with the devkit's splits and "difficult" labels ignored."""

    multilabel = True

    def __init__(self, train_split: Literal["train", "trainval"] = "train", download: bool = False, **kwargs):
        """
        Args:
            train_split: ``train`` (validate on the devkit's ``val``) or ``trainval`` (validation carved out of it).
            download: fetch and unpack both VOC2007 tars into ``data_dir`` (torchvision's URLs).
            **kwargs: the common options of :class:`~tl_lightning.data.base.TLDataModule`.
        """
        super().__init__(**kwargs)
        if train_split not in ("train", "trainval"):
            raise TLError(f"train_split must be 'train' or 'trainval', not '{train_split}'; fix --data.train_split.")
        self.train_split = train_split
        self.download = download

    @property
    def classes(self) -> list[str]:
        return VOC_CLASSES

    def prepare_data(self) -> None:
        _ = self.root  # finds the devkit folder, downloading it first when asked to

    @functools.cached_property
    def root(self) -> str:
        """The ``VOC2007`` folder (downloaded and unpacked first when asked to)."""
        data_dir = CONTRACT.data_dir(self.data_dir)
        candidates = (".", "VOC2007", DEVKIT)
        if self.download and not os.path.isfile(os.path.join(data_dir, DEVKIT, "ImageSets", "Main", "test.txt")):
            from torchvision.datasets.utils import download_and_extract_archive
            from torchvision.datasets.voc import DATASET_YEAR_DICT

            for key in ("2007", "2007-test"):
                tar = DATASET_YEAR_DICT[key]
                CONTRACT.download(lambda: download_and_extract_archive(tar["url"], data_dir, filename=tar["filename"],
                                                                       md5=tar["md5"]), data_dir)
        return CONTRACT.find_root(data_dir, candidates, _is_root)

    def image_ids(self, image_set: str) -> list[str]:
        path = os.path.join(self.root, "ImageSets", "Main", f"{image_set}.txt")
        CONTRACT.require_files(self.root, [path])
        with open(path) as f:
            return [line.split()[0] for line in f if line.strip()]

    def build_split(self, split: str) -> Optional[Source]:
        if split == "val" and self.train_split == "trainval":
            return None
        ids = self.image_ids(self.train_split if split == "train" else split)
        annotations = [os.path.join(self.root, "Annotations", f"{i}.xml") for i in ids]
        images = [os.path.join(self.root, "JPEGImages", f"{i}.jpg") for i in ids]
        CONTRACT.require_files(self.root, annotations + images)
        targets = np.stack([read_targets(a) for a in annotations]) if ids else np.zeros((0, len(VOC_CLASSES)))
        return FileSource(images, targets.astype(np.float32))
