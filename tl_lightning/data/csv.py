"""Your own images listed in a CSV file (Flash's ``from_csv``): a path column and labels.

On-disk contract: a CSV with a header row, e.g. ::

    path,label,split
    images/a.jpg,rose,train
    images/b.jpg,tulip,val

* ``path_column``: the image file, absolute or relative to ``data_dir`` (default: the CSV's own folder);
* labels, one of:
    - ``label_column``: one class name per row (multi-class);
    - ``label_column`` + ``label_separator``: several class names per row, e.g. ``"rose;tulip"`` (multi-label);
    - ``label_columns``: one column per class holding 1 (present), 0 (absent), or -1/empty (unknown, ignored in
      loss and metric) (multi-label);
* ``split_column`` (optional): ``train``, ``val`` (or ``valid``/``validation``) or ``test`` per row; a split
  without rows is carved out of train (stratified, ``seed``). Without it, the whole CSV is split by
  ``val_fraction`` / ``test_fraction``.

Class names are sorted (numerically where they are all integers) unless ``classes`` fixes them and their order.
"""
from __future__ import annotations

import csv
import os
from functools import cached_property
from typing import Optional

import numpy as np

from tl_lightning.data.base import FileSource, Source, TLDataModule
from tl_lightning.errors import TLError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
PRESENT, ABSENT, UNKNOWN = 1, 0, -1
FLAG_VALUES = {"1": PRESENT, "1.0": PRESENT, "true": PRESENT, "yes": PRESENT,
               "0": ABSENT, "0.0": ABSENT, "false": ABSENT, "no": ABSENT, "-1": UNKNOWN, "": UNKNOWN}


def natural_sorted(names) -> list[str]:
    """Class names sorted numerically when they are all integers, else alphabetically."""
    names = list(names)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


class CSVDataModule(TLDataModule):
    """Images listed in a CSV file with their labels (multi-class or multi-label) and optionally their split."""

    def __init__(self, csv_file: Optional[str] = None, data_dir: Optional[str] = None, path_column: str = "path",
                 label_column: Optional[str] = "label", label_separator: Optional[str] = None,
                 label_columns: Optional[list[str]] = None, split_column: Optional[str] = None,
                 classes: Optional[list[str]] = None, delimiter: str = ",", report: bool = True, **kwargs):
        """
        Args:
            csv_file: the CSV file (with a header row).
            data_dir: folder that relative image paths start from; default the CSV's folder.
            path_column: column with the image path.
            label_column: column with the class name (or names, with ``label_separator``).
            label_separator: splits ``label_column`` into several class names: multi-label.
            label_columns: one 1/0/-1 column per class, named after it: multi-label.
            split_column: column with train/val/test per row.
            classes: class names in the order of the model's outputs; default all names found, sorted.
            delimiter: the CSV's field separator.
            report: check every image file before training and print the data report.
        """
        super().__init__(data_dir=data_dir, report=report, **kwargs)
        self.csv_file = csv_file
        self.path_column = path_column
        self.label_column = label_column
        self.label_separator = label_separator
        self.label_columns = list(label_columns) if label_columns else None
        self.split_column = split_column
        self.fixed_classes = list(classes) if classes else None
        self.delimiter = delimiter
        self.multilabel = bool(self.label_separator or self.label_columns)

    # ----- reading the CSV ---------------------------------------------------------------------------------
    @cached_property
    def rows(self) -> list[dict]:
        """The CSV's rows as dicts, after checking that the configured columns exist."""
        if not self.csv_file:
            raise TLError("set --data.csv_file to the CSV that lists your images and labels.")
        if not os.path.isfile(self.csv_file):
            raise TLError(f"CSV file '{self.csv_file}' does not exist; point --data.csv_file at it.")
        with open(self.csv_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=self.delimiter)
            rows = list(reader)
            header = reader.fieldnames or []
        needed = {"path_column": [self.path_column]}
        if self.label_columns:
            needed["label_columns"] = self.label_columns
        elif self.label_column:
            needed["label_column"] = [self.label_column]
        else:
            raise TLError("no labels configured; set --data.label_column or --data.label_columns.")
        if self.split_column:
            needed["split_column"] = [self.split_column]
        for arg, columns in needed.items():
            absent = [c for c in columns if c not in header]
            if absent:
                raise TLError(f"column(s) {', '.join(absent)} not in '{self.csv_file}' (columns: "
                              f"{', '.join(header)}); fix --data.{arg}.")
        if not rows:
            raise TLError(f"'{self.csv_file}' has no rows; list one image per row under the header.")
        return rows

    def _names(self, row: dict) -> list[str]:
        """The class names of one row (``label_column`` rows)."""
        value = (row.get(self.label_column) or "").strip()
        if self.label_separator:
            return [n.strip() for n in value.split(self.label_separator) if n.strip()]
        return [value] if value else []

    @cached_property
    def classes(self) -> list[str]:
        if self.label_columns:
            return list(self.label_columns)
        found = {n for row in self.rows for n in self._names(row)}
        if self.fixed_classes:
            unknown = sorted(found - set(self.fixed_classes))
            if unknown:
                raise TLError(f"labels {', '.join(unknown[:10])} in '{self.csv_file}' are not in --data.classes; "
                              "add them there or remove those rows.")
            return self.fixed_classes
        if not found:
            raise TLError(f"column '{self.label_column}' of '{self.csv_file}' is empty; fill in the labels.")
        return natural_sorted(found)

    def _target(self, row: dict, line: int):
        if self.label_columns:
            values = []
            for c in self.label_columns:
                value = (row.get(c) or "").strip().lower()
                if value not in FLAG_VALUES:
                    raise TLError(f"line {line} of '{self.csv_file}': column '{c}' holds '{row.get(c)}'; use 1, 0 or "
                                  "-1 (empty = unknown).")
                values.append(FLAG_VALUES[value])
            return np.asarray(values, dtype=np.float32)
        index = {n: i for i, n in enumerate(self.classes)}
        names = self._names(row)
        if self.multilabel:
            target = np.zeros(len(self.classes), dtype=np.float32)
            target[[index[n] for n in names]] = PRESENT
            return target
        if not names:
            raise TLError(f"line {line} of '{self.csv_file}' has no label in column '{self.label_column}'; fill it in "
                          "or remove the row.")
        return index[names[0]]

    def _path(self, row: dict, line: int) -> str:
        path = (row.get(self.path_column) or "").strip()
        if not path:
            raise TLError(f"line {line} of '{self.csv_file}' has no path in column '{self.path_column}'; fill it in "
                          "or remove the row.")
        root = self.data_dir or os.path.dirname(os.path.abspath(self.csv_file))
        return os.path.normpath(os.path.join(root, os.path.expanduser(path)))

    def _split(self, row: dict, line: int) -> str:
        if not self.split_column:
            return "train"
        value = (row.get(self.split_column) or "").strip().lower()
        if value not in SPLIT_NAMES:
            raise TLError(f"line {line} of '{self.csv_file}': split '{row.get(self.split_column)}' is not one of "
                          f"{', '.join(SPLIT_NAMES)}; fix column '{self.split_column}'.")
        return SPLIT_NAMES[value]

    @cached_property
    def samples(self) -> dict[str, tuple[list[str], list]]:
        """split -> (image paths, targets); line numbers count the header as line 1."""
        out: dict[str, tuple[list[str], list]] = {}
        for line, row in enumerate(self.rows, start=2):
            paths, targets = out.setdefault(self._split(row, line), ([], []))
            paths.append(self._path(row, line))
            targets.append(self._target(row, line))
        if "train" not in out:
            raise TLError(f"no training rows in '{self.csv_file}'; mark some rows 'train' in column "
                          f"'{self.split_column}'.")
        return out

    def build_split(self, split: str) -> Optional[Source]:
        if split not in self.samples:
            return None
        paths, targets = self.samples[split]
        return FileSource(paths, np.stack(targets) if self.multilabel else np.asarray(targets, dtype=np.int64))
