"""The data report printed before training, and the up-front check that every image file decodes.

A user's own data set is where broken downloads, empty folders and one-image classes hide. With ``report`` on,
a :class:`~tl_lightning.data.base.TLDataModule` checks each image file once in ``setup`` (a fast reduced-size
decode, in threads; results cached by path, size and modification time), drops the files that do not decode
(or stops, with ``bad_images=fail``) and prints a short table: images per class per split, the smallest
class, and the unreadable files. A class missing from a split, or a file that cannot be decoded, raises a
:class:`DataReportWarning` that names them, so nothing fails silently mid-epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from tl_lightning.atomic import write_text
from tl_lightning.errors import TLError

#: what to do with image files that do not decode: drop them (and warn), stop with an error, or not check
BAD_IMAGE_POLICIES = ("drop", "fail", "ignore")
#: files named in a warning or an error; the report keeps them all
NAMED_FILES = 20
#: classes shown in the printed table; the rest are summarised
TABLE_ROWS = 40


class DataReportWarning(UserWarning):
    """A problem with the data found before training (a class missing from a split, an unreadable file)."""


# ----- decoding check ----------------------------------------------------------------------------------------
def decode_error(path: str) -> Optional[str]:
    """Why ``path`` cannot be decoded as an image, or None when it can.

    JPEGs are decoded at 1/8 scale (Pillow's draft mode), which reads the whole stream, so truncated and
    corrupt files are caught at a fraction of the cost of a full decode.
    """
    try:
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
        return None
    except Exception as e:  # any decoder error means the file cannot be trained on
        message = str(e).replace(f" '{path}'", "").replace(str(path), "").strip()
        return f"{e.__class__.__name__}: {message}" if message else e.__class__.__name__


def _signature(paths: Sequence[str]) -> str:
    h = hashlib.sha1()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def find_unreadable(paths: Sequence[str], cache_dir: Optional[str] = None, workers: Optional[int] = None) -> dict:
    """{path: reason} for the files among ``paths`` that do not decode.

    The answer is cached under ``<cache_dir>/image_checks`` keyed by every path, size and modification time,
    so a second run over unchanged files costs one ``stat`` per file.
    """
    paths = list(dict.fromkeys(paths))
    cache_file = None
    if cache_dir:
        cache_file = os.path.join(cache_dir, "image_checks", f"{_signature(paths)}.json")
        try:
            with open(cache_file) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Pillow releases the GIL while decoding
        reasons = list(pool.map(decode_error, paths))
    bad = {p: r for p, r in zip(paths, reasons) if r is not None}
    if cache_file:
        try:
            write_text(cache_file, json.dumps(bad))
        except (OSError, TLError):
            pass  # the cache is an optimisation only
    return bad


def file_paths(dataset) -> Optional[list[str]]:
    """The file of each sample of a :class:`SampleSet`, or None when its source is not file-backed."""
    paths = getattr(dataset.source, "paths", None)
    if paths is None:
        return None
    return [paths[i] for i in dataset.indices]


def _named(files: dict) -> str:
    shown = [f"{p} ({r})" for p, r in list(files.items())[:NAMED_FILES]]
    more = len(files) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def unreadable_message(bad: dict, where: str) -> str:
    return (f"{len(bad)} image file(s) in {where} cannot be decoded and were left out: {_named(bad)}; "
            "replace or remove them (--data.bad_images=fail stops instead).")


def warn_unreadable(bad: dict, where: str) -> None:
    """Warn, naming the files, that ``bad`` ({path: reason}) were left out of ``where``."""
    warnings.warn(unreadable_message(bad, where), DataReportWarning, stacklevel=2)


def drop_unreadable(dataset, policy: str = "drop", cache_dir: Optional[str] = None):
    """``(dataset without its undecodable files, {path: reason})``; ``policy='fail'`` raises instead."""
    if policy not in BAD_IMAGE_POLICIES:
        raise TLError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got '{policy}'; "
                      "fix --data.bad_images.")
    paths = file_paths(dataset)
    if policy == "ignore" or not paths:
        return dataset, {}
    bad = find_unreadable(paths, cache_dir)
    if not bad:
        return dataset, {}
    if policy == "fail":
        raise TLError(f"{len(bad)} image file(s) cannot be decoded: {_named(bad)}; replace or remove them, "
                      "or set --data.bad_images=drop to train without them.")
    keep = [i for i, p in enumerate(paths) if p not in bad]
    return dataset.subset(keep), bad


# ----- the report ----------------------------------------------------------------------------------------------
def class_counts(targets: np.ndarray, num_classes: int) -> list[int]:
    """Images per class: class indices are counted, multi-label rows count once per positive label."""
    targets = np.asarray(targets)
    if targets.ndim > 1:
        return (targets == 1).sum(0).astype(int).tolist()
    targets = targets[targets >= 0].astype(np.int64)
    return np.bincount(targets, minlength=num_classes)[:num_classes].tolist()


@dataclass
class DataReport:
    """Images per class per split and the files that were dropped, for one DataModule."""

    name: str
    classes: list[str]
    counts: dict  # split -> images per class
    unreadable: dict = field(default_factory=dict)  # path -> reason
    policy: str = "drop"

    @classmethod
    def of(cls, name: str, classes: Sequence[str], splits: dict, unreadable: Optional[dict] = None,
           policy: str = "drop") -> "DataReport":
        counts = {s: class_counts(ds.targets, len(classes)) for s, ds in splits.items()}
        return cls(name, list(classes), counts, dict(unreadable or {}), policy)

    @property
    def missing(self) -> dict:
        """split -> names of the classes without a single image in it (empty splits are not listed)."""
        out = {}
        for split, counts in self.counts.items():
            if sum(counts) == 0:
                continue
            absent = [c for c, n in zip(self.classes, counts) if n == 0]
            if absent:
                out[split] = absent
        return out

    @property
    def smallest(self) -> tuple[str, int]:
        """(class, images) of the class with the fewest training images."""
        counts = self.counts.get("train") or next(iter(self.counts.values()))
        i = int(np.argmin(counts))
        return self.classes[i], int(counts[i])

    def problems(self) -> list[str]:
        """One sentence per problem found, each naming the classes or files concerned."""
        out = []
        for split, absent in self.missing.items():
            names = ", ".join(f"'{c}'" for c in absent[:NAMED_FILES])
            more = f" and {len(absent) - NAMED_FILES} more" if len(absent) > NAMED_FILES else ""
            out.append(f"{len(absent)} class(es) have no images in the {split} split: {names}{more}; add images "
                       "of them there (or change the split fractions), or their scores will be meaningless.")
        if self.unreadable:
            out.append(unreadable_message(self.unreadable, "the data set"))
        return out

    def table(self) -> str:
        splits = list(self.counts)
        rows = [(c, [self.counts[s][i] for s in splits]) for i, c in enumerate(self.classes)]
        shown = rows if len(rows) <= TABLE_ROWS else rows[: TABLE_ROWS - 1]
        body = [(c, [str(n) for n in ns]) for c, ns in shown]
        if len(shown) < len(rows):
            rest = rows[len(shown):]
            totals = [str(sum(ns[j] for _, ns in rest)) for j in range(len(splits))]
            body.append((f"({len(rest)} more classes)", totals))
        body.append(("total", [str(sum(self.counts[s])) for s in splits]))
        width = max([len("class")] + [len(c) for c, _ in body])
        cols = [max(len(s), *(len(ns[j]) for _, ns in body)) for j, s in enumerate(splits)]
        head = "class".ljust(width) + "".join(f" | {s.rjust(w)}" for s, w in zip(splits, cols))
        line = "-" * len(head)
        lines = [f"Data report: {self.name}, {len(self.classes)} classes", line, head, line]
        for c, ns in body:
            if c == "total":
                lines.append(line)
            lines.append(c.ljust(width) + "".join(f" | {n.rjust(w)}" for n, w in zip(ns, cols)))
        lines.append(line)
        cls_name, n = self.smallest
        lines.append(f"smallest class: '{cls_name}' ({n} training images)")
        lines.append(f"unreadable files: {len(self.unreadable)}" + (" (left out)" if self.unreadable else ""))
        return "\n".join(lines)

    def as_dict(self) -> dict:
        cls_name, n = self.smallest
        return {"classes": self.classes, "images_per_class": self.counts, "smallest_class": [cls_name, n],
                "unreadable_files": self.unreadable, "missing_classes": self.missing}

    def emit(self) -> None:
        """Print the table and warn about each problem (global rank 0 only)."""
        from lightning.pytorch.utilities import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return
        print(self.table(), flush=True)
        for problem in self.problems():
            warnings.warn(problem, DataReportWarning, stacklevel=2)
