"""``bench/perf.py``'s FineTune sections: ``overhead`` (the CLI stack vs a plain PyTorch loop), ``cache``
(FeatureExtraction with and without the feature cache), ``ddp`` (2 CPU processes vs 1) and ``switches``
(``channels_last``, ``bf16-mixed``, ``compile``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from bench.perf_common import REPO, TIMER_ENV, Row, Size, StepTimer, interleaved, median, wait_for


# ----- the two fine-tuning loops ----------------------------------------------------------------------------
def digits_data(size: Size, **kw):
    from tl_lightning.data import DigitsDataModule

    args = dict(batch_size=size.batch_size, image_size=size.image_size, num_workers=size.num_workers,
                backbone=size.backbone,
                val_fraction=0.1, test_fraction=0.1, seed=0)
    args.update(kw)
    return DigitsDataModule(**args)


FINETUNE_CONFIG = "configs/finetune/quickstart.yaml"


def cli_args(size: Size, root: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``configs/finetune/quickstart.yaml`` through the CLI (its progress bar, logger and callbacks), cut to the
    bench's size: every group trains from the first step (``no_freeze``; the shipped head-only first epoch would
    time a different step), ``size``'s backbone, input size, batch and loader workers, and a fixed step count."""
    return [
        "--config", FINETUNE_CONFIG, f"--model.init_args.backbone={size.backbone}",
        "--model.init_args.unfreeze=no_freeze", f"--data.init_args.batch_size={size.batch_size}",
        f"--data.init_args.image_size={size.image_size}", f"--data.init_args.num_workers={size.num_workers}",
        "--data.init_args.val_fraction=0.1", "--data.init_args.test_fraction=0.1",
        f"--trainer.accelerator={size.accelerator}", "--trainer.devices=1",
        f"--trainer.max_steps={size.warmup + size.steps}", "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={root}", "--seed_everything=0", *extra,
    ]


def tl_steps_per_s(size: Size, extra: tuple[str, ...] = ()) -> float:
    """FineTune through the CLI's Trainer and callbacks (``run=False``, then ``fit`` with a StepTimer)."""
    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(cli_args(size, root, extra), run=False)
        timer = StepTimer(size.warmup)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps_per_s


def plain_steps_per_s(size: Size) -> float:
    """The same training in plain PyTorch: the CLI-built FineTune module's own forward and loss, its optimizer
    (the config's AdamW over its layer groups) and scheduler (stepped per epoch or per step, as the module's
    interval says), on the CLI-built DataModule's train loader, with no Trainer, logging or callbacks."""
    from bench.overhead import layout_of
    from tl_lightning.cli import run_cli

    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(cli_args(size, root), run=False)
    model, dm = cli.model, cli.datamodule
    layout = layout_of(model)  # FineTune's default channels_last: auto, as a fit sets it up: the same kernels
    model.to(size.device).train()
    L.seed_everything(0, verbose=False)
    dm.setup("fit")
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    schedule = configured.get("lr_scheduler", {}) if isinstance(configured, dict) else {}
    scheduler, per_step = schedule.get("scheduler"), schedule.get("interval") == "step"
    ends: list[float] = []
    total = size.warmup + size.steps
    while len(ends) < total:
        for x, y in dm.train_dataloader():
            x, y = layout(x.to(size.device, non_blocking=True)), y.to(size.device, non_blocking=True)
            loss = model.loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None and per_step:
                scheduler.step()
            wait_for(size.device)
            ends.append(time.perf_counter())
            if len(ends) == total:
                break
        if scheduler is not None and not per_step:
            scheduler.step()
    timed = ends[size.warmup - 1:]
    return (len(timed) - 1) / (timed[-1] - timed[0])


def bench_overhead(size: Size) -> list[Row]:
    res = interleaved({"plain PyTorch": lambda: plain_steps_per_s(size),
                       "tl_lightning": lambda: tl_steps_per_s(size)}, max(5, size.rounds))
    plain, tl = median(res["plain PyTorch"]), median(res["tl_lightning"])
    per_round = [p / t for p, t in zip(res["plain PyTorch"], res["tl_lightning"])]  # time per step, tl / plain
    ratio = median(per_round)  # each round's pair ran back to back: the median of their ratios
    rounds = ", ".join(f"{r:.3f}" for r in per_round)
    from bench.overhead import bench_adaptation_overhead, bench_icarl_overhead
    from bench.overhead_head import bench_head_overhead

    where = torch.cuda.get_device_name() if size.device == "cuda" else f"{torch.get_num_threads()} threads"
    rows = [Row("overhead", f"FineTune step time, tl_lightning / plain PyTorch ({FINETUNE_CONFIG}, no_freeze: "
                f"{size.backbone}, {size.image_size} px, batch {size.batch_size}, {where})",
                tl, plain, "steps/s", ratio, "<= 1.05", f"per round: {rounds}", ratio <= 1.05)]
    if size.device == "cpu":  # the cached-feature head and the digit pair: CPU-sized work
        rows += [*bench_head_overhead(rounds=max(5, size.rounds)),
                 *bench_adaptation_overhead(rounds=max(5, size.rounds)),
                 *bench_icarl_overhead(rounds=max(5, size.rounds))]
    return rows


# ----- feature cache ----------------------------------------------------------------------------------------
def feature_extraction_fit_s(size: Size, cache: bool) -> float:
    from tl_lightning.methods import FeatureExtraction

    with tempfile.TemporaryDirectory() as cache_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.seed_everything(0, verbose=False)
        args = dict(backbone=size.backbone, weights="bundled", embedding="pooled", cache_dir=cache_dir)
        # without the cache the DataModule serves images: they go through the frozen backbone in every step
        dm = digits_data(size, augment=False, samples_per_class=size.cache_per_class, num_workers=None,
                         image_size=size.cache_image_size,
                         serve_features=FeatureExtraction.served_features(**args) if cache else None)
        model = FeatureExtraction(**args, num_classes=10)
        # validation every epoch, as in a normal run (on cached features too, with the cache)
        trainer = L.Trainer(max_epochs=size.cache_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)  # a cold cache: the one extraction pass is included
        return time.perf_counter() - start


def bench_cache(size: Size) -> list[Row]:
    n = size.cache_epochs
    res = interleaved({"cache": lambda: feature_extraction_fit_s(size, True),
                       "no cache": lambda: feature_extraction_fit_s(size, False)}, 1)
    speedup = res["no cache"][0] / res["cache"][0]
    return [Row("cache", f"FeatureExtraction {n} epochs (train + val), {10 * size.cache_per_class} images of "
                f"{size.cache_image_size} px: no cache / "
                f"cache (cold cache, extraction included)", res["cache"][0], res["no cache"][0], "s", speedup,
                f">= {0.8 * n:g} (0.8 N)", "", speedup >= 0.8 * n)]



# ----- DDP --------------------------------------------------------------------------------------------------
def cli_images_per_s(size: Size, devices: int) -> dict:
    """Images/s (all processes) of a FineTune CLI run in a subprocess, timed by a StepTimer on rank 0."""
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "timer.json"
        args = cli_args(size, root) + ["--trainer.callbacks+=bench.perf_common.StepTimer", "--test_after_fit=false",
                                       "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                                       f"--trainer.devices={devices}"]
        if devices > 1:
            args.append("--trainer.strategy=ddp")
        # one thread a process (Lightning's DDP sets that too): 2 processes use 2 cores, 1 process 1 core
        env = dict(os.environ, **{TIMER_ENV: str(out), TIMER_ENV + "_WARMUP": str(size.warmup),
                                  "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
        proc = subprocess.run([sys.executable, "-m", "tl_lightning", "fit", *args], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"CLI run with {devices} device(s) failed:\n{proc.stderr[-2000:]}")
        res = json.loads(out.read_text())
    res["images_per_s"] = res["steps_per_s"] * res["batch_size"] * res["world_size"]
    return res


def bench_ddp(size: Size) -> list[Row]:
    info: dict[int, list[dict]] = {}
    many = torch.cuda.device_count() if size.device == "cuda" else 2  # all visible GPUs, or 2 CPU processes
    if many < 2:
        return [Row("ddp", "FineTune images/s, DDP over all visible GPUs / 1 GPU", float("nan"), float("nan"),
                    "img/s", float("nan"), note=f"{many} GPU visible: DDP needs 2 or more")]

    def run(devices: int) -> Callable[[], float]:
        def measure() -> float:
            info.setdefault(devices, []).append(cli_images_per_s(size, devices))
            return info[devices][-1]["images_per_s"]
        return measure

    res = interleaved({"1 process": run(1), f"{many} processes": run(many)}, max(1, size.rounds - 1))
    one, two = median(res["1 process"]), median(res[f"{many} processes"])
    if size.device == "cuda":
        return [Row("ddp", f"FineTune images/s, DDP on {many} GPUs / 1 GPU ({torch.cuda.get_device_name()}), batch "
                    f"{size.batch_size} per process", two, one, "img/s", two / one, "", "")]
    threads = f"{info[1][0]['threads']} thread vs 2 x {info[2][0]['threads']}"
    return [Row("ddp", f"FineTune images/s, 2 CPU processes (gloo) / 1 process, batch {size.batch_size} "
                f"per process ({threads})", two, one, "img/s", two / one, "",
                f"{os.cpu_count()} cores shared by both runs")]


# ----- speed switches ---------------------------------------------------------------------------------------
def bench_switches(size: Size) -> list[Row]:
    # the default is channels_last: auto (NHWC for this convnet); NCHW is the layout without it
    switches = {"default (channels_last: auto)": ("--model.channels_last=auto",),
                "bf16-mixed": ("--trainer.precision=bf16-mixed",),
                "bf16-mixed, NCHW": ("--trainer.precision=bf16-mixed", "--model.channels_last=false")}
    runs = {"NCHW": lambda: tl_steps_per_s(size, ("--model.channels_last=false",))}
    runs.update({name: (lambda extra=extra: tl_steps_per_s(size, extra)) for name, extra in switches.items()})
    res = interleaved(runs, size.rounds)
    base = median(res["NCHW"])
    rows = [Row("switches", f"FineTune steps/s: {name} / NCHW (channels_last=false)", median(res[name]), base,
                "steps/s", median(res[name]) / base, "", f"--{' --'.join(a.lstrip('-') for a in switches[name])}")
            for name in switches]
    if size.compile:
        compiled = StepTimerRun(size, ("--model.compile=true",))
        try:
            res = interleaved({"default": lambda: tl_steps_per_s(size), "compile": compiled}, 1)
        except Exception as err:  # no C++ compiler, or an unsupported op: reported, not fatal
            rows.append(Row("switches", "FineTune steps/s: torch.compile / default", float("nan"), float("nan"),
                            "steps/s", float("nan"), note=f"failed: {type(err).__name__}: {str(err)[:80]}"))
            return rows
        rows.append(Row("switches", "FineTune steps/s: torch.compile / default (after warm-up)", res["compile"][0],
                        res["default"][0], "steps/s", res["compile"][0] / res["default"][0], "",
                        f"--model.compile=true; compiling took {compiled.compile_s:.0f} s"))
    return rows


class StepTimerRun:
    """A compiled run: the warm-up (where compilation happens) is timed separately from the steady state."""

    def __init__(self, size: Size, extra: tuple[str, ...]):
        self.size, self.extra, self.compile_s = size, extra, float("nan")

    def __call__(self) -> float:
        start = time.perf_counter()
        steps_per_s = tl_steps_per_s(self.size, self.extra)
        total = time.perf_counter() - start
        self.compile_s = max(0.0, total - self.size.steps / steps_per_s)
        return steps_per_s


