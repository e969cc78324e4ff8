"""Benchmark: the six DataModules - feature-extraction accuracy on real data, and input pipeline vs backbone speed.

    nice -n 10 python -m bench.datasets [--quick] [--data-root ../shared/data]

1. Feature-extraction test accuracy (``FeatureExtraction``: frozen bundled ImageNet EfficientNet-Lite0,
   penultimate features, linear head, AdamW, last epoch's weights) on the real data in ``../shared/data``:
   the CUB-200-2011 10-class subset at 224 px (official split: 270 train / 30 val carved / 243 test) and an
   MNIST subset at 64 px (``--mnist-train`` per-class-balanced training digits from the official train set,
   ``--mnist-test`` stratified test digits from the official test set).
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

import lightning as L
import numpy as np
import torch

from tl_lightning.backbones import DEFAULT_BACKBONE, create_backbone
from tl_lightning.data import (CUB200DataModule, Flowers102DataModule, MNISTDataModule, MNISTMDataModule,
                               SVHNDataModule, VOC2007DataModule)
from tl_lightning.data.base import default_num_workers, stratified_split
from tl_lightning.methods.feature_extraction import FeatureExtraction

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def accuracy_run(dm, epochs: int, cache_dir: str, lr: float = 3e-3) -> dict:
    """Train a linear head on frozen Lite0 features; test accuracy of the last epoch's weights."""
    L.seed_everything(0, verbose=False)
    dm.setup()
    model = FeatureExtraction(backbone=DEFAULT_BACKBONE, weights="bundled", num_classes=dm.num_classes,
                              class_names=dm.class_names, lr=lr, weight_decay=1e-4, cache_dir=cache_dir)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    test = trainer.test(model, datamodule=dm, verbose=False)[0]
    sizes = {k: len(v) for k, v in dm.splits.items()}
    return {"acc": test["test/acc"], "sizes": sizes, "seconds": time.perf_counter() - start}


def limit_eval_splits(dm, n_test: int, n_val: int) -> None:
    """Keep a stratified ``n_test`` of the test split and ``n_val`` of validation (a CPU-sized MNIST run)."""
    dm.setup()
    for split, n in (("test", n_test), ("val", n_val)):
        ds = dm.splits[split]
        if n < len(ds):
            _, keep = stratified_split(ds.targets, n / len(ds), seed=0)
            dm.splits[split] = ds.subset(keep)


def loader_throughput(dm, workers: int, seconds: float, max_batches: int) -> float:
    """Images per second read from the train loader (after its first batch, which starts workers)."""
    dm.num_workers = workers
    dm.persistent_workers = False
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    n, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(it):
        n += len(x)
        if time.perf_counter() - start > seconds or i + 1 >= max_batches:
            break
    rate = n / (time.perf_counter() - start)
    del it
    return rate


def forward_throughput(model, size: int, batch: int, seconds: float) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - start)


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
    parser.add_argument("--mnist-train", type=int, default=2000)
    parser.add_argument("--mnist-test", type=int, default=1000)
    parser.add_argument("--skip-accuracy", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.mnist_train, args.mnist_test = 500, 500
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

    # ----- 1. feature-extraction accuracy on real data ----------------------------------------------------------
    if not args.skip_accuracy:
        common = dict(cache_dir=cache, num_workers=default_num_workers(), persistent_workers=False)
        cub = CUB200DataModule(data_dir=real["cub"], batch_size=32, **common)
        cub_res = accuracy_run(cub, epochs=40 if not args.quick else 20, cache_dir=cache)
        mnist = MNISTDataModule(data_dir=real["mnist"], image_size=64, batch_size=64,
                                samples_per_class=args.mnist_train // 10, val_fraction=0.02, **common)
        limit_eval_splits(mnist, args.mnist_test, n_val=min(500, args.mnist_test))
        mnist_res = accuracy_run(mnist, epochs=30 if not args.quick else 15, cache_dir=cache)
        lines += ["## Feature-extraction test accuracy (real data)", "",
                  "Frozen Lite0, penultimate features (1280-d), linear head (AdamW, lr 3e-3, weight decay 1e-4), "
                  "features extracted once and cached; test accuracy of the last epoch's head.", "",
                  "| data set | input | train / val / test | epochs | test accuracy | wall time |",
                  "|---|---|---|---|---|---|"]
        for name, res, size, epochs in (("CUB-200-2011, 10-class subset", cub_res, "224 px", 40 if not args.quick else 20),
                                        ("MNIST subset", mnist_res, "64 px", 30 if not args.quick else 15)):
            s = res["sizes"]
            lines.append(f"| {name} | {size} | {s['train']} / {s['val']} / {s['test']} | {epochs} | "
                         f"{100 * res['acc']:.1f}% | {res['seconds']:.0f} s |")
        lines.append("")
        print("\n".join(lines[-6:]), flush=True)

    # ----- 2. train-loader throughput vs backbone forward -------------------------------------------------------
    fixtures = scaled_fixtures(os.path.join(tmp, "fixtures"), args.quick)
    _patch_mat_md5_for_fixtures()
    seconds = 4.0 if args.quick else 10.0
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
    forward = {}
    rows = []
    for name, cls, data_dir, size, batch, what in setups:
        dm = cls(data_dir=data_dir, image_size=size, batch_size=batch, augment=True, cache_dir=cache)
        dm.setup()
        if (size, batch) not in forward:
            forward[(size, batch)] = forward_throughput(model, size, batch, seconds)
        single = loader_throughput(dm, 0, seconds, max_batches=10_000)
        multi = loader_throughput(dm, workers, seconds, max_batches=10_000) if workers > 0 else single
        fwd = forward[(size, batch)]
        rows.append((name, what % len(dm.splits["train"]), size, batch, single, multi, fwd))
        print(f"{name}: loader {single:.0f} img/s (0 workers), {multi:.0f} img/s ({workers} workers); "
              f"forward {fwd:.0f} img/s", flush=True)
    lines += ["## Train-loader throughput vs backbone forward", "",
              f"Train split with augmentation on (random-resized crop; flips for photos only), batches as in the "
              f"configs. Loader: images/s out of the DataLoader, in-process (0 workers) and with the default "
              f"{workers} worker(s); forward: Lite0 inference (eval, no grad) on batches of the same shape, "
              f"{torch.get_num_threads()} threads. Ratio > 1: the loader outpaces the model.", "",
              "| DataModule | data | input | batch | loader, 0 workers | loader, "
              f"{workers} worker(s) | backbone forward | ratio (loader / forward) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, what, size, batch, single, multi, fwd in rows:
        lines.append(f"| {name} | {what} | {size} px | {batch} | {single:.0f} img/s | {multi:.0f} img/s | "
                     f"{fwd:.0f} img/s | {max(single, multi) / fwd:.1f} |")
    lines.append("")
    path = os.path.join(RESULTS, "datasets.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(RESULTS, "datasets.png"))
    print("\n".join(lines))
    print(f"wrote {path}")


def _patch_mat_md5_for_fixtures() -> None:
    """The scaled SVHN/Flowers fixtures are not the official files, so torchvision's MD5 check is skipped for
    this benchmark's throughput runs only (the check itself is exercised in tests/test_datasets.py)."""
    import torchvision.datasets.flowers102 as flowers
    import torchvision.datasets.svhn as svhn

    svhn.check_integrity = lambda *a, **k: True
    flowers.check_integrity = lambda *a, **k: True


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(x - 0.27, [r[4] for r in rows], 0.27, label="loader, 0 workers")
    ax.bar(x, [r[5] for r in rows], 0.27, label="loader, default workers")
    ax.bar(x + 0.27, [r[6] for r in rows], 0.27, label="Lite0 forward")
    ax.set_xticks(x, [f"{n}\n{r[2]} px" for n, r in zip(names, rows)])
    ax.set_ylabel("images / s")
    ax.set_yscale("log")
    ax.set_title("Train-loader throughput vs backbone forward (CPU)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
