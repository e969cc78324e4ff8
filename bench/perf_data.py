"""``bench/perf.py``'s data sections: ``pipeline`` (each DataModule's loader vs the backbone's training speed),
``workers`` (loader worker settings) and ``herding`` (iCaRL's exemplar selection vs the textbook loop)."""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench.perf_common import REPO, SHARED, Row, Size, interleaved


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


