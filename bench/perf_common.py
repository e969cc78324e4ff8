"""What the sections of ``bench/perf.py`` share: the sizes of a run (CPU, quick, CUDA), a result row, the step timer
(in process, or inside a CLI subprocess as ``--trainer.callbacks+=bench.perf_common.StepTimer``) and interleaved
rounds."""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED = REPO.parent / "shared" / "data"
SECTIONS = ("overhead", "cache", "extraction", "pipeline", "workers", "herding", "ddp", "switches")
CUDA_SECTIONS = ("overhead", "ddp", "switches")  # the others measure host-side work
TIMER_ENV = "TL_BENCH_STEP_TIMER"  # where a StepTimer inside a CLI subprocess writes its measurement


@dataclass
class Size:
    """Problem sizes of one benchmark run."""
    backbone: str = "tf_efficientnet_lite0"
    image_size: int = 32
    batch_size: int = 32
    warmup: int = 3
    steps: int = 12
    rounds: int = 3
    cache_epochs: int = 10
    cache_per_class: int = 30
    cache_image_size: int = 224  # the backbone's own input size, where extraction costs what it costs in practice
    natural_size: int = 128
    loader_images: int = 256
    herd_samples: int = 6000
    herd_dim: int = 1280
    herd_budget: int = 2000
    herd_classes: int = 10
    compile: bool = True
    device: str = "cpu"
    num_workers: int = 0  # loader workers of the FineTune runs (both sides)

    @property
    def accelerator(self) -> str:
        return "gpu" if self.device == "cuda" else "cpu"


FULL = Size()
QUICK = Size(batch_size=16, steps=6, rounds=2, cache_epochs=4, cache_per_class=10, natural_size=64,
             loader_images=96, herd_samples=1500, herd_budget=500, compile=False)
CUDA = Size(image_size=224, batch_size=64, warmup=5, steps=40, device="cuda", num_workers=4)
CUDA_QUICK = Size(image_size=224, batch_size=64, warmup=3, steps=10, rounds=2, compile=False, device="cuda",
                  num_workers=4)


def wait_for(device) -> None:
    """Block until ``device`` finished its queued work, so that a timestamp means the step is done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    section: str
    name: str
    a: float  # the measured side
    b: float  # the reference side
    unit: str
    ratio: float
    target: str = ""
    note: str = ""
    ok: Optional[bool] = None
    extra: dict = field(default_factory=dict)


# ----- timing helpers ---------------------------------------------------------------------------------------
class StepTimer(L.Callback):
    """Steps/s after ``warmup`` training batches (from the end of batch ``warmup`` to the end of the last one).

    In a CLI subprocess (``--trainer.callbacks+=bench.perf_common.StepTimer``) the warm-up comes from and the result
    goes to the JSON file named by ``$TL_BENCH_STEP_TIMER``."""

    def __init__(self, warmup: int = -1):
        self.warmup = warmup if warmup >= 0 else int(os.environ.get(TIMER_ENV + "_WARMUP", "3"))
        self.ends: list[float] = []
        self.batch_size = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        wait_for(pl_module.device)
        self.ends.append(time.perf_counter())
        if not self.batch_size:
            x = batch[0] if isinstance(batch, (list, tuple)) else next(iter(batch.values()))[0]
            self.batch_size = len(x)

    @property
    def steps_per_s(self) -> float:
        timed = self.ends[self.warmup - 1:] if self.warmup > 0 else self.ends
        return (len(timed) - 1) / (timed[-1] - timed[0])

    def on_train_end(self, trainer, pl_module) -> None:
        out = os.environ.get(TIMER_ENV)
        if out and trainer.is_global_zero:
            Path(out).write_text(json.dumps({"steps_per_s": self.steps_per_s, "world_size": trainer.world_size,
                                             "batch_size": self.batch_size, "threads": torch.get_num_threads()}))


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each run once per round, the order rotated every round so drift of a shared machine hits all alike."""
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(runs[name]())
            print(f"  round {r + 1}/{rounds} {name}: {out[name][-1]:.3f}", flush=True)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


