"""Benchmark: the six DataModules - feature-extraction accuracy on real data, and input pipeline vs backbone speed.

    nice -n 10 python -m bench.datasets [--quick] [--data-root ../shared/data]

1. Feature-extraction test accuracy of the shipped configs on the real data in ``../shared/data``, each run
   through the CLI as the README says (``bench/common.py``: one process per row, wall time and peak PSS):
   ``configs/feature_extraction/cub200.yaml`` (the CUB-200-2011 10-class subset, official split, its recipe chosen
   on validation) and ``configs/feature_extraction/mnist.yaml`` (a balanced MNIST training subset, the official
   test set; ``--quick`` trains on fewer digits).
2. Train-loader throughput (img/s, with training augmentation on, as fine-tuning reads it every epoch) of every
   DataModule at its config's input size, single-process and with the default worker count, beside the
   backbone's forward throughput (eval mode, no grad) at the same size and batch, measured in the same run.
   Real data where ``../shared/data`` has it (MNIST, MNIST-M, CUB); the other three read fixtures written by
   ``tests/fixtures/datasets.py`` in their official formats, scaled up to realistic image sizes (VOC
   500x375 JPEGs, Flowers102 500x600 JPEGs, SVHN 32x32 .mat arrays).

Writes ``bench/results/datasets.md`` and ``bench/results/datasets.png``.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from pathlib import Path

from bench.common import run
from tl_lightning.backbones import DEFAULT_BACKBONE, create_backbone
from tl_lightning.data import (CUB200DataModule, Flowers102DataModule, MNISTDataModule, MNISTMDataModule,
                               SVHNDataModule, VOC2007DataModule)
from tl_lightning.data.base import default_num_workers

RESULTS = os.path.join(os.path.dirname(__file__), "results")


ACCURACY_ROWS = (  # (data set, config, its data folder under --data-root, the data it reads, quick overrides)
    ("CUB-200-2011, 10-class subset", "configs/feature_extraction/cub200.yaml", "CUB_200_2011_subset10",
     "official split: 300 train (20% carved for validation), 243 test", ()),
    ("MNIST", "configs/feature_extraction/mnist.yaml", "MNIST",
     "500 training digits per class (10% carved for validation; --quick: 50), the official 10,000 test digits",
     ("--data.init_args.samples_per_class=50",)),
)


def accuracy_rows(data_root: str, work: Path, quick: bool) -> list[str]:
    """The shipped feature-extraction configs of the real data sets through the CLI: a table of test accuracy."""
    lines = ["## Feature-extraction test accuracy of the shipped configs (real data)", "",
             "Each row is `python -m tl_lightning fit --config CONFIG --data.init_args.data_dir=DIR` (fit, then the "
             "CLI's test of the checkpoint the config names), one process per row, on a cold feature cache; wall "
             "time = the whole command.", "",
             "| data set | config | data | chosen / fitted | test accuracy | wall time | peak PSS |",
             "|---|---|---|---|---|---|---|"]
    for name, config, folder, split, quick_overrides in ACCURACY_ROWS:
        data_dir = Path(data_root) / folder
        if not data_dir.exists():
            lines.append(f"| {name} | `{config}` | - | - | not run: {data_dir} is missing | - | - |")
            continue
        run_dir = work / Path(config).stem
        m = run([config], [f"--data.init_args.data_dir={data_dir.resolve()}", *(quick_overrides if quick else ())],
                run_dir, env={"TL_LIGHTNING_CACHE": str(work / "cache")})
        chosen = (m.get("summary") or {}).get("recipe") or (m.get("head_fit") or {}).get("head") or "linear head"
        pss = m["bench"]["peak_pss_mb"]
        lines.append(f"| {name} | `{config}`{' (quick)' if quick and quick_overrides else ''} | {split} | {chosen} | "
                     f"{100 * m['metrics']['test/acc']:.1f}% | {m['bench']['wall_s']:.0f} s | "
                     f"{pss if pss is not None else '-'} MB |")
    return lines + [""]


def loader_throughput(dm, workers: int, seconds: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) read from the train loader, after its
    first batch (which starts the workers). The CPU rate only means something in-process (0 workers)."""
    dm.num_workers = workers
    dm.persistent_workers = False
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # as in a loader worker (PyTorch gives each one thread)
    try:
        it = iter(dm.train_dataloader())
        next(it)
        n, wall, cpu = 0, time.perf_counter(), time.process_time()
        for x, _ in it:
            n += len(x)
            if time.perf_counter() - wall > seconds:
                break
        rates = n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)
        del it
    finally:
        torch.set_num_threads(threads)
    return rates


def forward_throughput(model, size: int, batch: int, seconds: float, threads: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the backbone's inference on random batches, run on
    ``threads`` threads."""
    x = torch.randn(batch, 3, size, size)
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            model(x)  # warm-up
            n, wall, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall < seconds:
                model(x)
                n += batch
    finally:
        torch.set_num_threads(default)
    return n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9)


def best_of(measure, rounds: int) -> tuple[float, float]:
    """The best of ``rounds`` measurements, per entry: the least disturbed by other jobs on a shared machine."""
    results = [measure() for _ in range(rounds)]
    return tuple(max(r[i] for r in results) for i in range(len(results[0])))


def scaled_fixtures(root: str, quick: bool) -> dict:
    """Official-format copies, bigger than the tests', of the data sets that ../shared/data lacks."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    from fixtures.datasets import random_voc_objects, write_flowers102, write_svhn, write_voc2007

    n_voc = 120 if quick else 300
    objects = random_voc_objects(n_voc)
    ids = sorted(objects)
    third = len(ids) // 3
    write_voc2007(os.path.join(root, "voc"), objects,
                  {"train": ids[:third], "val": ids[third:2 * third], "test": ids[2 * third:]}, image_size=(500, 375))
    write_flowers102(os.path.join(root, "flowers"), n_classes=10, per_split=5 if quick else 10, n_test=5,
                     image_size=(500, 600))
    write_svhn(os.path.join(root, "svhn"), n_train=5000 if quick else 20000, n_test=1000)
    return {"voc": os.path.join(root, "voc"), "flowers": os.path.join(root, "flowers"),
            "svhn": os.path.join(root, "svhn")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller subsets and shorter timings (~3 minutes)")
    parser.add_argument("--data-root", default=os.path.join("..", "shared", "data"))
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(RESULTS, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench_datasets_")
    cache = os.path.join(tmp, "cache")
    root = args.data_root
    real = {"mnist": os.path.join(root, "MNIST"), "mnistm": os.path.join(root, "mnist_m"),
            "cub": os.path.join(root, "CUB_200_2011_subset10")}
    lines = [f"# DataModules benchmark{' (--quick)' if args.quick else ''}", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
             f"(shared with other jobs), torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"backbone {DEFAULT_BACKBONE} (bundled ImageNet weights).", ""]

    # ----- 1. feature-extraction accuracy of the shipped configs on real data ----------------------------------
    if not args.skip_accuracy:
        lines += accuracy_rows(root, Path(tmp), args.quick)
        print("\n".join(lines[-(len(ACCURACY_ROWS) + 2):]), flush=True)

    # ----- 2. train-loader throughput vs backbone forward -------------------------------------------------------
    fixtures = scaled_fixtures(os.path.join(tmp, "fixtures"), args.quick)
    seconds, rounds = (3.0, 1) if args.quick else (5.0, 2)
    workers = default_num_workers()
    setups = [
        ("VOC2007", VOC2007DataModule, fixtures["voc"], 224, 32, "fixture: %d JPEGs 500x375"),
        ("Flowers102", Flowers102DataModule, fixtures["flowers"], 224, 32, "fixture: %d JPEGs 500x600"),
        ("CUB200", CUB200DataModule, real["cub"], 224, 32, "real: %d JPEGs (10-class subset)"),
        ("MNIST", MNISTDataModule, real["mnist"], 64, 64, "real: %d digits (idx .gz)"),
        ("MNIST-M", MNISTMDataModule, real["mnistm"], 64, 64, "real: %d PNGs"),
        ("SVHN", SVHNDataModule, fixtures["svhn"], 64, 64, "fixture: %d digits (.mat)"),
    ]
    model = create_backbone(DEFAULT_BACKBONE, "bundled", num_classes=0).eval()
    rows = []
    for name, cls, data_dir, size, batch, what in setups:
        dm = cls(data_dir=data_dir, image_size=size, batch_size=batch, augment=True, cache_dir=cache)
        dm.setup()
        # interleaved, best of `rounds`: loader and model see the same background load
        fwd_wall = best_of(lambda: forward_throughput(model, size, batch, seconds, torch.get_num_threads()), rounds)[0]
        # CPU cost on one thread: with several, threads that wait on each other on a busy machine burn CPU time
        fwd_cpu = best_of(lambda: forward_throughput(model, size, batch, seconds, 1), rounds)[1]
        single_wall, single_cpu = best_of(lambda: loader_throughput(dm, 0, seconds), rounds)
        multi_wall = best_of(lambda: loader_throughput(dm, workers, seconds), rounds)[0] if workers else single_wall
        rows.append(dict(name=name, what=what % len(dm.splits["train"]), size=size, batch=batch,
                         single=single_wall, single_cpu=single_cpu, multi=multi_wall, fwd=fwd_wall, fwd_cpu=fwd_cpu))
        print(f"{name}: loader {single_wall:.0f} img/s ({single_cpu:.0f} per CPU-s) in-process, {multi_wall:.0f} "
              f"img/s with {workers} worker(s); forward {fwd_wall:.0f} img/s ({fwd_cpu:.0f} per CPU-s)", flush=True)
    lines += ["## Train-loader throughput vs backbone forward", "",
              "Train split with augmentation on (random-resized crop; flips for photos only), batches as in the "
              "configs. Loader: images/s out of the DataLoader in-process (0 workers) and with the default "
              f"{workers} worker(s); forward: Lite0 inference (eval, no grad, {torch.get_num_threads()} threads) on "
              "batches of the same shape. Wall-clock rates depend on the other jobs sharing the machine, so each "
              f"is the best of {rounds} interleaved {seconds:.0f}-second windows, and the per-CPU-second rates "
              "(images per second of CPU time this process used, loader and model each on one thread, as a loader "
              "worker runs) give the load-independent cost. "
              "CPU ratio = CPU cost of the model per image / CPU cost of loading one image: above 1 the loader is "
              "cheaper than the model it feeds.", "",
              f"| DataModule | data | input | batch | loader, 0 workers | loader, {workers} worker(s) | "
              "Lite0 forward | loader / forward (wall) | CPU ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['what']} | {r['size']} px | {r['batch']} | {r['single']:.0f} img/s "
                     f"({r['single_cpu']:.0f}/CPU-s) | {r['multi']:.0f} img/s | {r['fwd']:.0f} img/s "
                     f"({r['fwd_cpu']:.0f}/CPU-s) | {max(r['single'], r['multi']) / r['fwd']:.1f} | "
                     f"{r['single_cpu'] / r['fwd_cpu']:.1f} |")
    lines.append("")
    path = os.path.join(RESULTS, "datasets.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(RESULTS, "datasets.png"))
    print("\n".join(lines))
    print(f"wrote {path}")


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(x - 0.27, [r["single"] for r in rows], 0.27, label="loader, 0 workers")
    ax.bar(x, [r["multi"] for r in rows], 0.27, label="loader, default workers")
    ax.bar(x + 0.27, [r["fwd"] for r in rows], 0.27, label="Lite0 forward")
    ax.set_xticks(x, [f"{r['name']}\n{r['size']} px" for r in rows])
    ax.set_ylabel("images / s")
    ax.set_yscale("log")
    ax.set_title("Train-loader throughput vs backbone forward (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
