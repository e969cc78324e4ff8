"""A data set's on-disk contract, checked: where its root is, whether its files are there, downloads.

Every failure is one :class:`~tl_lightning.errors.TLError` sentence that quotes the contract (the expected
files) and where to get them, built by :func:`~tl_lightning.errors.missing_dataset`.
"""
from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from tl_lightning.atomic import atomic_open
from tl_lightning.errors import DatasetNotFoundError, TLError, missing_dataset


@dataclass(frozen=True)
class Contract:
    """What a data set needs on disk (``expected``), where to get it (``url``) and whether ``download`` can."""

    name: str
    expected: str
    url: str
    downloadable: bool = False

    @property
    def source(self) -> str:
        return f"{self.url} (or --data.download=true)" if self.downloadable else self.url

    def missing(self, root, detail: str = "") -> DatasetNotFoundError:
        expected = f"{self.expected} ({detail})" if detail else self.expected
        return missing_dataset(self.name, root, expected, self.source)

    def data_dir(self, data_dir: Optional[str]) -> str:
        """``data_dir`` as given, or one sentence asking for it."""
        if not data_dir:
            raise TLError(f"--data.data_dir is not set: point it at the folder that holds {self.name} "
                          f"({self.expected}); get it from {self.source}.")
        return os.path.expanduser(str(data_dir))

    def find_root(self, data_dir: Optional[str], candidates: Sequence[str], is_root: Callable[[str], bool]) -> str:
        """The first of ``candidates`` (paths relative to ``data_dir``) for which ``is_root`` holds."""
        base = self.data_dir(data_dir)
        for rel in candidates:
            path = os.path.normpath(os.path.join(base, rel))
            if is_root(path):
                return path
        raise self.missing(base)

    def require_files(self, root: str, paths: Iterable[str]) -> None:
        """Raise when any of ``paths`` is not a file, naming how many are missing and the first one."""
        paths = list(paths)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise self.missing(root, f"{len(missing)} of {len(paths)} files missing, first '{missing[0]}'")

    def download(self, fetch: Callable[[], object], dest: str) -> None:
        """Run ``fetch`` (a torchvision download), turning a network or checksum failure into one sentence."""
        try:
            os.makedirs(dest, exist_ok=True)
            fetch()
        except TLError:
            raise
        except Exception as e:  # URLError, RuntimeError (all mirrors failed / bad MD5), OSError
            reason = " ".join(str(e).split())[:200] or e.__class__.__name__
            raise TLError(f"could not download {self.name} into '{dest}' ({e.__class__.__name__}: {reason}); "
                          f"without network get {self.expected} from {self.url} by hand and point "
                          f"--data.data_dir at it.") from e


def is_writable_dir(path: str) -> bool:
    """True when ``path`` is a folder we may write into: writable for this process and not marked read-only
    (no write bit), so a read-only data folder stays untouched even for root."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & 0o222) and os.access(path, os.W_OK)


def gunzip(src: str, dst: str) -> None:
    """Decompress ``src`` into ``dst`` atomically (a killed run leaves no half-written file)."""

    def unreadable(e: BaseException) -> TLError:
        return TLError(f"cannot unpack '{src}' ({e.__class__.__name__}: {e}); replace it with the official file.")

    try:
        with gzip.open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
            while True:
                try:
                    chunk = fin.read(1 << 20)
                except (OSError, EOFError) as e:  # a truncated or corrupt archive, not a failed write
                    raise unreadable(e) from e
                if not chunk:
                    break
                fout.write(chunk)
    except (OSError, EOFError) as e:  # the archive cannot be opened
        raise unreadable(e) from e
