"""Run folders: every command gets its own folder, so a rerun never overwrites an earlier run.

``trainer.default_root_dir`` from a config file (or the default ``runs/<config name>``) is an *experiment
folder*. Each ``fit`` creates ``<experiment>/<YYYYmmdd-HHMMSS>`` inside it (``-1``, ``-2`` ... on a clash) and
points ``<experiment>/latest`` (a relative symlink) at it; ``validate``/``test``/``predict`` create
``<experiment>/<YYYYmmdd-HHMMSS>-<command>`` and leave ``latest`` alone. ``--ckpt_path last`` is the newest run's
``checkpoints/last.ckpt``; a ``fit`` that resumes from a checkpoint inside one of the experiment's runs continues
in that run's folder.

``--trainer.default_root_dir=DIR`` typed on the command line is the run folder itself, used as is: that is how
``submit`` (``<run root>/slurm-<job id>``, kept by a requeued job) and ``sweep`` (``<sweep>/trial-NN``) name
their folders. A fresh ``fit`` into such a folder that already holds a finished run (``metrics.json``) is refused.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Optional, Sequence

from tl_lightning.errors import TLError

LATEST = "latest"
LAST_CHECKPOINT = os.path.join("checkpoints", "last.ckpt")
#: rank 0 hands its run folder to the DDP processes Lightning starts (they rerun the same command line)
HANDOFF_ENV = "TL_LIGHTNING_RUN_DIR"
_ROOT_FLAG = "--trainer.default_root_dir"
#: run folders this process created, removed again when the command fails before it wrote anything
_created: list[str] = []


def root_dir_typed(argv: Sequence[str]) -> bool:
    """True when ``--trainer.default_root_dir`` is on the command line (the run folder is then used as is)."""
    return any(a == _ROOT_FLAG or str(a).startswith(_ROOT_FLAG + "=") for a in argv)


def _is_run(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def runs_newest_first(root: str) -> list[str]:
    """The run folders under an experiment folder, newest first (their names sort by start time)."""
    try:
        names = [n for n in os.listdir(root) if n != LATEST and _is_run(os.path.join(root, n))]
    except FileNotFoundError:
        return []
    return [os.path.join(root, n) for n in sorted(names, reverse=True)]


def find_last_checkpoint(root: str) -> Optional[str]:
    """``checkpoints/last.ckpt`` of the newest run under ``root`` that has one."""
    for run in runs_newest_first(root):
        path = os.path.join(run, LAST_CHECKPOINT)
        if os.path.isfile(path):
            return path
    return None


def run_folder_of(ckpt_path: str, root: str) -> Optional[str]:
    """The run folder (``<root>/<run>``) that holds ``ckpt_path``, or None when it is not one of root's runs."""
    real_root = os.path.realpath(root)
    folder = os.path.dirname(os.path.realpath(ckpt_path))
    while os.path.dirname(folder) != folder:
        if os.path.dirname(folder) == real_root:
            return os.path.join(root, os.path.basename(folder))
        folder = os.path.dirname(folder)
    return None


def _reserve(root: str, name: str) -> str:
    """Create ``<root>/<name>`` (``<name>-1``, ``-2`` ... when taken) atomically; returns its path."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise TLError(f"cannot create the experiment folder '{root}' ({e.strerror}); "
                      f"set {_ROOT_FLAG} to a writable folder.") from e
    for n in range(1000):
        path = os.path.join(root, name if n == 0 else f"{name}-{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise TLError(f"cannot create a run folder in '{root}' ({e.strerror}); "
                          f"set {_ROOT_FLAG} to a writable folder.") from e
    raise TLError(f"'{root}' has 1000 runs named {name}; set {_ROOT_FLAG} to another folder.")


def point_latest(root: str, run_dir: Optional[str]) -> None:
    """Make ``<root>/latest`` a relative symlink to ``run_dir`` (replaced atomically); None removes it."""
    link = os.path.join(root, LATEST)
    if run_dir is None:
        if os.path.islink(link):
            os.remove(link)
        return
    tmp = f"{link}.tmp{os.getpid()}"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(os.path.normpath(run_dir)), tmp)
    os.replace(tmp, link)


def new_run_folder(root: str, command: str) -> str:
    """A fresh run folder for ``command`` under the experiment folder ``root`` (see the module docstring)."""
    job, tasks = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if job and tasks > 1:  # every srun task runs this: they must agree without talking to each other
        path = os.path.join(root, f"slurm-{job}" + ("" if command == "fit" else f"-{command}"))
        os.makedirs(path, exist_ok=True)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = _reserve(root, stamp if command == "fit" else f"{stamp}-{command}")
        _created.append(path)
    if command == "fit":
        point_latest(root, path)
    return path


def handed_over(root: str) -> Optional[str]:
    """The run folder rank 0 chose, in a DDP process Lightning started for the same command line."""
    value = os.environ.get(HANDOFF_ENV, "")
    if int(os.environ.get("LOCAL_RANK", "0") or 0) < 1 or "\n" not in value:
        return None
    handed_root, run_dir = value.split("\n", 1)
    return run_dir if os.path.normpath(handed_root) == os.path.normpath(root) else None


def hand_over(root: str, run_dir: str) -> None:
    os.environ[HANDOFF_ENV] = f"{root}\n{run_dir}"


def run_name(root: str, run_dir: str) -> str:
    """A run's display name (W&B): ``<experiment>/<run>`` for a versioned run folder, else the folder's name."""
    root, run_dir = os.path.normpath(root), os.path.normpath(run_dir)
    if os.path.dirname(run_dir) == root:
        return f"{os.path.basename(root)}/{os.path.basename(run_dir)}"
    return os.path.basename(run_dir)


def resolve_last(root: str, typed: bool) -> str:
    """``--ckpt_path last``: the newest run's last checkpoint (one sentence when there is none)."""
    path = os.path.join(root, LAST_CHECKPOINT) if typed else find_last_checkpoint(root)
    if path is None or not os.path.isfile(path):
        where = f"'{root}'" if typed else f"any run under '{root}'"
        raise TLError(f"--ckpt_path last found no checkpoints/last.ckpt in {where}; "
                      "pass the path of a checkpoint or train without --ckpt_path.")
    return path


def choose_run_dir(root: str, typed: bool, command: str, ckpt_path: Optional[str]) -> str:
    """The folder this command writes into (see the module docstring)."""
    if typed:
        if command == "fit" and not ckpt_path and os.path.isfile(os.path.join(root, "metrics.json")):
            raise TLError(f"'{root}' already holds a finished run (metrics.json); resume it with --ckpt_path, "
                          f"or pass a new {_ROOT_FLAG} (or leave it out for a fresh versioned run folder).")
        if not os.path.exists(root):
            _created.append(root)  # removed again if the command fails before writing a checkpoint
        return root
    handed = handed_over(root)
    if handed:
        return handed
    if command == "fit" and ckpt_path:
        own = run_folder_of(ckpt_path, root)
        if own is not None:
            return own
    return new_run_folder(root, command)


def discard_unused_run_folders() -> None:
    """Remove the run folders this process created that hold no checkpoint (the command failed early)."""
    while _created:
        path = _created.pop()
        if os.path.isdir(os.path.join(path, "checkpoints")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        root = os.path.dirname(path)
        link = os.path.join(root, LATEST)
        if os.path.islink(link) and not os.path.exists(link):
            fits = [r for r in runs_newest_first(root) if _is_fit_run(os.path.basename(r))]
            point_latest(root, fits[0] if fits else None)


def forget_created() -> None:
    """The command succeeded: its run folders stay."""
    _created.clear()


def _is_fit_run(name: str) -> bool:
    suffix = name[len("YYYYmmdd-HHMMSS"):]
    return name[:8].isdigit() and (suffix == "" or suffix[1:].isdigit())
