"""What every benchmark shares: the paths, one way to run the CLI the way a user does, and ``mean ± std``. A
benchmark is a list of rows over the shipped configs; each row is ``run(...)``. Results files are written with
``tl_lightning.atomic.write_text``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bench.memory import run_with_peak_pss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"


def cli(args: Sequence[str], log: Path, env: Optional[dict] = None, threads: Optional[int] = None) -> dict:
    """``python -m tl_lightning ARGS`` in a fresh process from the repository root, its output appended to ``log``
    (a file, not a pipe: the PSS sampler waits on the process); ``{"wall_s", "peak_pss_mb"}`` (peak PSS of the
    process and its loader workers, ``None`` where PSS cannot be read). A failed command stops the benchmark
    with the end of its log."""
    cmd = [sys.executable, "-m", "tl_lightning", *map(str, args)]
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", WANDB_MODE="offline", **(env or {}))
    if threads is not None:
        full_env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        started = time.perf_counter()
        proc, peak = run_with_peak_pss(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); the end of {log}:\n"
                         f"{log.read_text()[-3000:]}")
    return {"wall_s": round(time.perf_counter() - started, 1),
            "peak_pss_mb": None if peak is None else round(peak / 2 ** 20)}


def run(configs: Sequence[str], overrides: Sequence[str], run_dir: Path, log: Optional[Path] = None,
        env: Optional[dict] = None, threads: Optional[int] = None) -> dict:
    """One row: ``fit --config C1 [--config C2 ...] OVERRIDES`` into ``run_dir`` (fit, then the CLI's test of the
    checkpoint the config names), as a user runs it; the run's ``metrics.json`` plus ``bench`` (wall time, peak
    PSS)."""
    args = ["fit", *[a for c in configs for a in ("--config", c)], *overrides, f"--trainer.default_root_dir={run_dir}"]
    measured = cli(args, log or run_dir.with_suffix(".log"), env, threads)
    return {**json.loads((run_dir / "metrics.json").read_text()), "bench": measured}


def mean_std(values: Sequence[Optional[float]], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of the values that exist, times ``scale`` (percent by default), with the sample standard
    deviation (``ddof=1``, the spread of a few seeds); one value alone, ``-`` for none."""
    v = scale * np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"
