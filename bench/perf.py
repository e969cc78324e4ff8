"""Performance of tl_lightning (issue 8): every figure a ratio of two runs measured side by side in one run.

Sections (``--only`` picks some):

* ``overhead``: FineTune steps/s through the real CLI stack (Trainer, progress bar, logger, the CLI's callbacks)
  vs a hand-written PyTorch loop with the same timm model, data loader, AdamW, batch size and thread count,
  interleaved over rounds. Target: time ratio <= 1.05.
* ``cache``: N epochs of FeatureExtraction with the feature cache (cold: extraction included) vs the backbone
  run every step. Target: speedup >= 0.8 N.
* ``extraction``: images/s of a cold feature extraction from JPEG files (the real CUB subset, generated
  Flowers-like 500x375 JPEGs) vs the raw forward of the same backbone on in-memory tensors. Target: >= 0.9.
* ``pipeline``: train-loader images/s of each DataModule (default workers) vs the backbone's training
  images/s at the same image size. Target: loader/backbone >= 1 (the loader is not the bottleneck).
* ``workers``: loader images/s over 2 epochs with ``num_workers`` 0 / the default / persistent or not.
* ``herding``: iCaRL herding of 6,000 1280-d features for a 2,000-exemplar budget, ``herding_order`` vs the
  textbook loop that re-sums the chosen exemplars every step.
* ``ddp``: FineTune images/s of 2 CPU processes (gloo, via the CLI) vs 1 process with the same cores.
* ``switches``: FineTune steps/s of the default (``channels_last: auto``, NHWC for this convnet), of
  ``--trainer.precision=bf16-mixed`` with and without NHWC, vs NCHW (``--model.channels_last=false``), and of
  ``--model.compile=true`` vs the default, interleaved.

Writes ``bench/results/perf.md``, ``perf.json``, ``perf.png`` (every ratio) and ``perf_pipeline.png``.

    python -m bench                      # everything: 11 minutes on 2 busy CPU cores
    python -m bench --quick              # smaller sizes, a few minutes
    python -m bench --only overhead,cache
    python -m bench --device cuda        # on a GPU machine: overhead, ddp (all visible GPUs) and switches
                                         # (bf16-mixed, channels_last, compile) -> bench/results/perf_cuda.md

On ``--device cuda`` the sizes are a GPU's (224 px, batch 64) and every timestamp waits for the device
(``torch.cuda.synchronize``), in the plain loop and in ``StepTimer`` alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F

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

    In a CLI subprocess (``--trainer.callbacks+=bench.perf.StepTimer``) the warm-up comes from and the result
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


# ----- the two fine-tuning loops ----------------------------------------------------------------------------
def digits_data(size: Size, **kw):
    from tl_lightning.data import DigitsDataModule

    args = dict(batch_size=size.batch_size, image_size=size.image_size, num_workers=size.num_workers,
                backbone=size.backbone,
                val_fraction=0.1, test_fraction=0.1, seed=0)
    args.update(kw)
    return DigitsDataModule(**args)


def cli_args(size: Size, root: str, extra: tuple[str, ...] = ()) -> list[str]:
    """A normal fine-tuning run's arguments (progress bar, default logger, the CLI's callbacks)."""
    return [
        "--model=tl_lightning.methods.FineTune", f"--model.backbone={size.backbone}", "--model.weights=bundled",
        "--model.unfreeze=no_freeze", "--model.lr_decay=1.0", "--model.lr=0.001",
        "--data=tl_lightning.data.DigitsDataModule", f"--data.batch_size={size.batch_size}",
        f"--data.image_size={size.image_size}", f"--data.num_workers={size.num_workers}", "--data.val_fraction=0.1",
        "--data.test_fraction=0.1", f"--trainer.accelerator={size.accelerator}", "--trainer.devices=1",
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
    """The same training in plain PyTorch: the timm model, a linear head, AdamW, the same DataLoader."""
    from tl_lightning.backbones import create_backbone

    L.seed_everything(0, verbose=False)
    dm = digits_data(size)
    dm.setup("fit")
    backbone = create_backbone(size.backbone, "bundled", num_classes=0)
    head = torch.nn.Linear(backbone.num_features, dm.num_classes)
    model = torch.nn.Sequential(backbone, head).to(size.device).train()
    from tl_lightning.backbones import is_convnet

    nhwc = is_convnet(backbone)  # what FineTune's default channels_last: auto does: the same kernels on both sides
    if nhwc:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    ends: list[float] = []
    total = size.warmup + size.steps
    while len(ends) < total:
        for x, y in dm.train_dataloader():
            x, y = x.to(size.device, non_blocking=True), y.to(size.device, non_blocking=True)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            wait_for(size.device)
            ends.append(time.perf_counter())
            if len(ends) == total:
                break
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
    rows = [Row("overhead", f"FineTune step time, tl_lightning / plain PyTorch ({size.backbone}, "
                f"{size.image_size} px, batch {size.batch_size}, {where})",
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


# ----- input pipeline ---------------------------------------------------------------------------------------
def datamodules(size: Size, tmp: Path) -> list[tuple[str, Callable, int, str]]:
    """(name, DataModule factory, image size, backbone) for every DataModule: real data where present,
    else generated files in the official layout (tests/fixtures) with realistic image sizes."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import datasets as fx
    from tl_lightning import data as D


    digit, natural = size.image_size, size.natural_size
    bb = size.backbone

    def real_or(path: Path, make):
        return str(path) if path.exists() else make()

    for name in ("mnist", "mnistm", "svhn", "cub", "flowers", "voc"):
        (tmp / name).mkdir(parents=True, exist_ok=True)

    out = [
        ("Digits (sklearn)", lambda: D.DigitsDataModule(image_size=digit, backbone=bb), digit, bb),
        ("MNIST", lambda: D.MNISTDataModule(data_dir=real_or(SHARED, lambda: fx.write_mnist(tmp / "mnist", 600)),
                                            image_size=digit, backbone=bb), digit, bb),
        ("MNIST-M", lambda: D.MNISTMDataModule(
            data_dir=real_or(SHARED / "mnist_m", lambda: fx.write_mnistm(tmp / "mnistm", 600)),
            image_size=digit, backbone=bb), digit, bb),
        ("SVHN (generated)", lambda: D.SVHNDataModule(data_dir=fx.write_svhn(tmp / "svhn", 600), image_size=digit,
                                                      backbone=bb), digit, bb),
        ("CUB-200 subset", lambda: D.CUB200DataModule(
            data_dir=real_or(SHARED / "CUB_200_2011_subset10", lambda: fx.write_cub(tmp / "cub", n_train=20)),
            image_size=natural, backbone=bb), natural, bb),
        ("Flowers102 (generated 500x375)", lambda: D.Flowers102DataModule(
            data_dir=fx.write_flowers102(tmp / "flowers", n_classes=5, per_split=20, image_size=(500, 375)),
            image_size=natural, backbone=bb), natural, bb),
        ("VOC2007 (generated 500x375)", lambda: D.VOC2007DataModule(
            data_dir=fx.write_voc2007(tmp / "voc", objects=fx.random_voc_objects(80), image_size=(500, 375)),
            image_size=natural, backbone=bb), natural, bb),
    ]
    if (SHARED / "MNIST").exists():
        out.append(("MNIST + digit_cnn (32 px)", lambda: D.MNISTDataModule(data_dir=str(SHARED), image_size=32,
                                                                          backbone="digit_cnn"), 32, "digit_cnn"))
    return out


def loader_images_per_s(dm, images: int, epochs: Optional[int] = None) -> float:
    """Images/s of the train loader, timed from the first batch on (worker start-up excluded), over epochs
    until ``images`` images (or exactly ``epochs`` epochs) were served."""
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen, start, epoch = 0, None, 0
    while (seen < images) if epochs is None else (epoch < epochs):
        for x, *_ in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen += len(x)
            if epochs is None and seen >= images:
                break
        epoch += 1
    return seen / (time.perf_counter() - start)


def backbone_images_per_s(backbone: str, image_size: int, batch_size: int, steps: int) -> float:
    """Training throughput of the backbone alone (forward, backward, AdamW) on in-memory tensors."""
    from tl_lightning.backbones import create_backbone

    model = torch.nn.Sequential(create_backbone(backbone, "none", num_classes=0)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, image_size, image_size)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - start)


def bench_pipeline(size: Size) -> list[Row]:
    rows = []
    throughput: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, px, bb in datamodules(size, Path(tmp)):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dm = make()
                    dm.batch_size = size.batch_size
                    loader = loader_images_per_s(dm, size.loader_images)
            except Exception as err:  # a DataModule that can't run here is reported, not fatal
                rows.append(Row("pipeline", name, float("nan"), float("nan"), "img/s", float("nan"),
                                note=f"skipped: {type(err).__name__}: {str(err)[:80]}"))
                continue
            if (bb, px) not in throughput:  # measured right after the first loader that needs it
                throughput[(bb, px)] = backbone_images_per_s(bb, px, size.batch_size, max(4, size.steps // 2))
            model = throughput[(bb, px)]
            ratio = loader / model
            rows.append(Row("pipeline", f"{name}: loader / {bb} training ({px} px, {dm.num_workers} worker(s))",
                            loader, model, "img/s", ratio, ">= 1", "", ratio >= 1))
            print(f"  {rows[-1].name}: {loader:.0f} vs {model:.0f} img/s", flush=True)
    return rows


def bench_workers(size: Size) -> list[Row]:
    from tl_lightning.data import CUB200DataModule
    from tl_lightning.data.base import default_num_workers

    cub = SHARED / "CUB_200_2011_subset10"
    if not cub.exists():
        return [Row("workers", "num_workers (needs ../shared/data CUB subset)", float("nan"), float("nan"), "img/s",
                    float("nan"), note="skipped: no real JPEG data")]
    default = default_num_workers()

    def run(workers: int, persistent: bool) -> Callable[[], float]:
        def measure() -> float:
            dm = CUB200DataModule(data_dir=str(cub), image_size=size.natural_size, batch_size=size.batch_size,
                                  num_workers=workers, persistent_workers=persistent, backbone=size.backbone)
            return loader_images_per_s(dm, 0, epochs=2)
        return measure

    configs = {"0 workers": run(0, False), f"default ({default}), persistent": run(default, True),
               f"default ({default}), not persistent": run(default, False), "2 workers, persistent": run(2, True)}
    res = interleaved(configs, 1)
    base = res["0 workers"][0]
    return [Row("workers", f"CUB {size.natural_size} px train loader over 2 epochs: {name} / 0 workers",
                res[name][0], base, "img/s", res[name][0] / base) for name in configs if name != "0 workers"]


# ----- herding ----------------------------------------------------------------------------------------------
def textbook_herding(features: torch.Tensor, m: int) -> list[int]:
    """iCaRL Alg. 4 as written: the mean of the chosen exemplars is re-summed from scratch at every step."""
    phi = F.normalize(features.float(), dim=1)
    mu = phi.mean(0)
    chosen: list[int] = []
    for k in range(1, m + 1):
        current = phi[chosen].sum(0) if chosen else torch.zeros_like(mu)
        dist = ((mu - (current + phi) / k) ** 2).sum(1)
        if chosen:
            dist[chosen] = float("inf")
        chosen.append(int(torch.argmin(dist)))
    return chosen


def bench_herding(size: Size) -> list[Row]:
    from tl_lightning.methods.exemplars import herding_order

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(size.herd_samples, size.herd_dim, generator=gen).relu()  # post-ReLU, like pooled features
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: extra threads only wait for each other (worse on a busy machine)
    for classes in (size.herd_classes,):
        labels = torch.arange(size.herd_samples) % classes
        per_class = size.herd_budget // classes

        def herd(fn) -> Callable[[], float]:
            def run() -> float:
                start = time.perf_counter()
                picks = [fn(feats[labels == c], per_class) for c in range(classes)]
                assert sum(len(p) for p in picks) == per_class * classes
                return time.perf_counter() - start
            return run

        res = interleaved({"herding_order": herd(herding_order), "textbook": herd(textbook_herding)}, 1)
        fast, slow = res["herding_order"][0], res["textbook"][0]
        rows.append(Row("herding", f"{size.herd_samples} x {size.herd_dim}-d, budget {size.herd_budget} "
                        f"({classes} class(es), {per_class} each): textbook / herding_order",
                        fast, slow, "s", slow / fast, "", f"herding_order {fast:.2f} s"))
    same = torch.equal(herding_order(feats[:500], 50), torch.tensor(textbook_herding(feats[:500], 50)))
    rows[0].note += f" (1 thread); same selection as the textbook loop: {same}"
    torch.set_num_threads(threads)
    return rows


# ----- DDP --------------------------------------------------------------------------------------------------
def cli_images_per_s(size: Size, devices: int) -> dict:
    """Images/s (all processes) of a FineTune CLI run in a subprocess, timed by a StepTimer on rank 0."""
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "timer.json"
        args = cli_args(size, root) + ["--trainer.callbacks+=bench.perf.StepTimer", "--test_after_fit=false",
                                       "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                                       f"--trainer.devices={devices}", "--data.val_fraction=0.1"]
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


# ----- report -----------------------------------------------------------------------------------------------
def bench_extraction(size: Size) -> list[Row]:
    from bench.extraction import bench_extraction as run

    return run(size.cache_image_size, size.batch_size, max(2, size.rounds - 1))


BENCHES = {"overhead": bench_overhead, "cache": bench_cache, "extraction": bench_extraction,
           "pipeline": bench_pipeline, "workers": bench_workers,
           "herding": bench_herding, "ddp": bench_ddp, "switches": bench_switches}


def fmt(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def write_report(rows: list[Row], size: Size, quick: bool, seconds: float, tag: str,
                 measured: Optional[list[str]] = None) -> Path:
    """``measured``: the sections this run measured when the others' rows are kept from the previous report."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    ran = (f"sections {', '.join(measured)} measured in this run ({seconds / 60:.1f} min), the other rows kept "
           "from the previous report" if measured else f"{seconds / 60:.1f} min in all")
    lines = [f"# Performance ({'--quick' if quick else 'full'} run)", "",
             f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, lightning {L.__version__}, "
             f"{torch.get_num_threads()} threads; {ran}. Each ratio compares two runs made side by side in one "
             "run (interleaved rounds, median).", "",
             "| section | measurement | measured | reference | unit | ratio | target | met | note |",
             "|---|---|---:|---:|---|---:|---|---|---|"]
    for r in rows:
        met = "" if r.ok is None else ("yes" if r.ok else "**no**")
        lines.append(f"| {r.section} | {r.name} | {fmt(r.a)} | {fmt(r.b)} | {r.unit} | {fmt(r.ratio)} | "
                     f"{r.target} | {met} | {r.note} |")
    path = RESULTS / f"perf{tag}.md"
    path.write_text("\n".join(lines) + "\n")
    (RESULTS / f"perf{tag}.json").write_text(json.dumps({"size": size.__dict__, "rows": [r.__dict__ for r in rows]},
                                                        indent=1, default=str))
    plot(rows, tag)
    return path


def plot(rows: list[Row], tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio == r.ratio]
    if not shown:
        return
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(shown) + 1.2))
    colors = ["tab:green" if r.ok else "tab:red" if r.ok is False else "tab:blue" for r in shown]
    ax.barh(range(len(shown)), [r.ratio for r in shown], color=colors)
    ax.set_yticks(range(len(shown)), [f"[{r.section}] {r.name[:70]}" for r in shown], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("ratio (log scale; green: target met, red: missed, blue: no target)")
    for i, r in enumerate(shown):
        ax.text(r.ratio, i, f" {r.ratio:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"perf{tag}.png", dpi=120)
    plt.close(fig)
    pipe = [r for r in shown if r.section == "pipeline"]
    if pipe:
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(pipe) + 1.2))
        ys = torch.arange(len(pipe)).float()
        ax.barh(ys - 0.2, [r.a for r in pipe], height=0.4, label="train loader")
        ax.barh(ys + 0.2, [r.b for r in pipe], height=0.4, label="backbone training")
        ax.set_yticks(ys.tolist(), [r.name.split(":")[0] for r in pipe], fontsize=8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("images/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"perf{tag}_pipeline.png", dpi=120)
        plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU table (overhead, ddp, switches), written to perf_cuda.md")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the in-process runs (default 1: steadier timings on a shared machine; "
                             "0 keeps torch's default)")
    args = parser.parse_args(argv)
    sections = CUDA_SECTIONS if args.device == "cuda" else SECTIONS
    only = [s for s in args.only.split(",") if s] or list(sections)
    unknown = set(only) - set(sections)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)} for --device {args.device}; choose from "
                     f"{', '.join(sections)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible here; run it on a GPU machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        size = CUDA_QUICK if args.quick else CUDA
    else:
        size = QUICK if args.quick else FULL
    start = time.perf_counter()
    rows: list[Row] = []
    tag = ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    kept = previous_rows(tag, exclude=only)  # --only re-measures some sections and keeps the others' rows
    for name in only:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        rows += BENCHES[name](size)
        print(f"   {time.perf_counter() - t:.0f} s", flush=True)
        merged = sorted(kept + rows, key=lambda r: SECTIONS.index(r.section))
        path = write_report(merged, size, args.quick, time.perf_counter() - start, tag,  # after every section
                            measured=only if kept else None)
    print(path.read_text())


def previous_rows(tag: str, exclude: list[str]) -> list[Row]:
    """Rows of the sections not in ``exclude`` from the last report with this tag (none if there is none)."""
    path = RESULTS / f"perf{tag}.json"
    if not path.exists():
        return []
    return [Row(**r) for r in json.loads(path.read_text())["rows"] if r["section"] not in exclude]


if __name__ == "__main__":
    main()
