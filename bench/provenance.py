"""Which code a benchmark run measured, so that ``--resume`` never serves a number from other code.

A finished run is kept only while the code it ran is the code a new run would run: the git tree of
``tl_lightning/`` (the committed package, uncommitted edits included through their content hash) and the torch
version. A row's configuration alone is not enough: a change in the library (how an epoch's metric is averaged,
how a loader shuffles) changes results under an unchanged config.

    code_version()  # {"tl_lightning": "<tree sha>[+<diff sha>]", "torch": "2.14.1+cpu"}
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout


def code_version() -> dict:
    """The package's git tree (plus a hash of any uncommitted change under it) and the torch version."""
    import torch

    tree = _git("rev-parse", "HEAD:tl_lightning")
    if tree is None:  # not a git checkout: hash the package's files instead
        digest = hashlib.sha1()
        for path in sorted((REPO / "tl_lightning").rglob("*.py")):
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
        version = "files:" + digest.hexdigest()
    else:
        version = tree.strip()
        diff = _git("diff", "HEAD", "--", "tl_lightning")
        untracked = _git("ls-files", "--others", "--exclude-standard", "--", "tl_lightning") or ""
        if diff or untracked.strip():
            extra = hashlib.sha1((diff or "").encode())
            for name in sorted(untracked.splitlines()):
                extra.update(name.encode() + b"\0" + (REPO / name).read_bytes())
            version += "+" + extra.hexdigest()[:12]
    return {"tl_lightning": version, "torch": torch.__version__}


def file_sha(relative: str) -> str:
    """The content hash of a repository file (a shipped config): a row is stale once its config is edited."""
    return hashlib.sha1((REPO / relative).read_bytes()).hexdigest()


def same_code(recorded: Optional[dict], now: dict) -> bool:
    """A run recorded without a code version (older than this check) is never kept."""
    return recorded == now
