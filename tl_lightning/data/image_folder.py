"""Your own images, one folder per class (the layout of torchvision's ``ImageFolder`` and Flash's ``from_folders``).

On-disk contract, either of:

* ``data_dir/train/<class>/*.jpg`` with optional ``data_dir/val/<class>/`` (or ``valid``, ``validation``) and
  ``data_dir/test/<class>/``; a split folder that is absent is carved out of train (stratified, ``seed``);
* ``data_dir/<class>/*.jpg``: one tree, split into train/val/test by ``val_fraction`` and ``test_fraction``,
  stratified by class, with ``seed``.

Images may sit in sub-folders of a class folder. Files ending in any of ``extensions`` are read (case does not
matter, hidden files are skipped). Class names are the folder names, sorted; the class index is the position
in that list. Every image file is checked before training and a data report is printed (``report``).
"""
from __future__ import annotations

import os
from functools import cached_property
from typing import Optional

import numpy as np

from tl_lightning.data.base import FileSource, Source, TLDataModule
from tl_lightning.data.files import IMAGE_EXTENSIONS, list_images, subfolders
from tl_lightning.errors import TLError

#: split name -> folder names accepted for it, in order of preference
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
LAYOUT = "data_dir/<class>/*.jpg, or data_dir/train/<class>/*.jpg plus optional val/ and test/"


class ImageFolderDataModule(TLDataModule):
    """Images in one folder per class, with or without train/val/test folders."""

    def __init__(self, data_dir: Optional[str] = None, extensions: Optional[list[str]] = None, report: bool = True,
                 **kwargs):
        """
        Args:
            data_dir: the folder that holds the class folders (or the train/val/test folders).
            extensions: file endings read as images; default jpg, jpeg, png, bmp, webp, gif, tif(f), ppm, pgm, pbm.
            report: check every image file before training and print the data report.
        """
        super().__init__(data_dir=data_dir, report=report, **kwargs)
        self.extensions = tuple(e if e.startswith(".") else f".{e}" for e in extensions) if extensions \
            else IMAGE_EXTENSIONS

    # ----- layout ------------------------------------------------------------------------------------------
    @cached_property
    def split_dirs(self) -> dict[str, str]:
        """split -> folder holding its class folders; just ``{'train': data_dir}`` for a single tree."""
        root = self.data_dir
        if not root:
            raise TLError(f"set --data.data_dir to the folder of your images, laid out as {LAYOUT}.")
        if not os.path.isdir(root):
            raise TLError(f"image folder '{root}' does not exist; point --data.data_dir at a folder laid out as "
                          f"{LAYOUT}.")
        folders = subfolders(root)
        found = {split: next((n for n in names if n in folders), None) for split, names in SPLIT_FOLDERS.items()}
        split_names = {n for names in SPLIT_FOLDERS.values() for n in names}
        if found["train"] is None:
            if any(found.values()):
                raise TLError(f"'{root}' has {', '.join(n for n in found.values() if n)} but no 'train' folder; add "
                              "data_dir/train/<class>/ or use a single data_dir/<class>/ tree.")
            return {"train": root}
        others = [f for f in folders if f not in split_names]
        if others:
            raise TLError(f"'{root}' mixes split folders ({', '.join(n for n in found.values() if n)}) with other "
                          f"folders ({', '.join(others[:5])}); use one layout: {LAYOUT}.")
        return {split: os.path.join(root, name) for split, name in found.items() if name}

    @cached_property
    def classes(self) -> list[str]:
        names = sorted({c for folder in self.split_dirs.values() for c in subfolders(folder)})
        if not names:
            raise TLError(f"no class folders under '{self.data_dir}'; put each class's images in its own folder: "
                          f"{LAYOUT}.")
        return names

    # ----- splits ------------------------------------------------------------------------------------------
    def files_of(self, split: str) -> tuple[list[str], np.ndarray]:
        """(image paths, class indices) of the images in ``split``'s folder."""
        folder = self.split_dirs[split]
        paths, targets = [], []
        for index, name in enumerate(self.classes):
            class_dir = os.path.join(folder, name)
            if os.path.isdir(class_dir):
                found = list_images(class_dir, self.extensions)
                paths += found
                targets += [index] * len(found)
        if not paths:
            raise TLError(f"no images in the class folders under '{folder}' (looked for "
                          f"{', '.join(self.extensions)}); add images or set --data.extensions.")
        return paths, np.asarray(targets, dtype=np.int64)

    def build_split(self, split: str) -> Optional[Source]:
        if split not in self.split_dirs:
            return None
        paths, targets = self.files_of(split)
        return FileSource(paths, targets)
