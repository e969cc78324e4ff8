"""Peak memory of a command and all its child processes, as PSS (proportional set size, Linux).

PSS divides every shared page by the number of processes that map it, so summing it over a run's processes
(the main process and its data-loader workers) counts memory the workers share with the main process once,
where summed RSS would count it once per worker. Read from ``/proc/<pid>/smaps_rollup``; no dependency.

    proc, peak = run_with_peak_pss(["python", "-m", "tl_lightning", "fit", ...], stdout=f)
"""
from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Optional


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree(root: int) -> list[int]:
    """``root`` and every process below it."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += _children(pid)
    return out


def pss_bytes(pid: int) -> int:
    """PSS of one process in bytes (0 when it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_bytes(root: int) -> int:
    """PSS summed over ``root`` and all its descendants."""
    return sum(pss_bytes(pid) for pid in _tree(root))


class PeakPSS:
    """Samples :func:`tree_pss_bytes` of ``pid`` every ``interval`` seconds in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakPSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def supported() -> bool:
    return Path(f"/proc/{os.getpid()}/smaps_rollup").exists()


def run_with_peak_pss(cmd: list[str], **popen_kwargs) -> tuple[subprocess.CompletedProcess, Optional[int]]:
    """Run ``cmd`` to completion; its CompletedProcess and the peak PSS in bytes of its process tree (None where
    ``/proc/*/smaps_rollup`` does not exist)."""
    with subprocess.Popen(cmd, **popen_kwargs) as proc:
        if not supported():
            proc.wait()
            return subprocess.CompletedProcess(cmd, proc.returncode), None
        with PeakPSS(proc.pid) as sampler:
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode), sampler.peak
