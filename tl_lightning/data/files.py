"""Image files on disk: which names count as images, and listing them under a folder."""
from __future__ import annotations

import os

#: file name endings read as images (case-insensitive), the formats Pillow decodes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def is_image_file(name: str, extensions=IMAGE_EXTENSIONS) -> bool:
    """True for a visible file whose name ends in one of ``extensions``."""
    base = os.path.basename(name)
    return not base.startswith(".") and base.lower().endswith(tuple(e.lower() for e in extensions))


def list_images(folder: str, extensions=IMAGE_EXTENSIONS) -> list[str]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), in sorted order."""
    found = []
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(current, f) for f in sorted(files) if is_image_file(f, extensions))
    return found


def subfolders(folder: str) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
