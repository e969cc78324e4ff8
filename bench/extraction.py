"""Feature extraction at the model's speed: images/s of a cold feature extraction from JPEG files vs the raw
forward throughput of the same frozen backbone on in-memory tensors (same batch size, image size, thread count
and memory layout), interleaved. Target: >= 0.9, i.e. decoding and resizing in the loader workers overlap the
forward pass instead of adding to it.

The extraction is the path a fit runs: the DataModule's served features (``dm.feature_matrices("train")``,
requested as the CLI requests them for ``FeatureExtraction``) on an empty feature cache (the DataModule's loader
with its default workers, the data side's frozen backbone in eval mode under ``no_grad``, the cache write
included). ``bench/perf.py``'s ``extraction`` section calls :func:`bench_extraction`.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def jpeg_datamodules(tmp: Path, image_size: int, batch_size: int) -> list[tuple[str, Callable]]:
    """(name, DataModule factory): the real CUB subset where present, and generated Flowers-like 500x375 JPEGs."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import datasets as fx
    from tl_lightning import data as D

    common = dict(image_size=image_size, batch_size=batch_size, augment=False, backbone="tf_efficientnet_lite0")
    out = []
    cub = SHARED / "CUB_200_2011_subset10"
    if cub.exists():
        out.append(("CUB-200 subset (real JPEGs)", lambda **kw: D.CUB200DataModule(data_dir=str(cub), **common, **kw)))
    flowers = fx.write_flowers102(tmp / "flowers", n_classes=10, per_split=30, image_size=(500, 375))
    out.append(("Flowers102-like (generated 500x375 JPEGs)",
                lambda **kw: D.Flowers102DataModule(data_dir=flowers, **common, **kw)))
    return out


MODEL_ARGS = dict(backbone="tf_efficientnet_lite0", weights="bundled", embedding="pooled")


def make_model(cache_dir: str):
    from tl_lightning.methods import FeatureExtraction

    return FeatureExtraction(**MODEL_ARGS, num_classes=10, cache_dir=cache_dir)


def served(cache_dir: str) -> dict:
    """What the CLI gives the DataModule for that model: its features, served from the data side."""
    from tl_lightning.methods import FeatureExtraction

    return FeatureExtraction.served_features(**MODEL_ARGS, cache_dir=cache_dir)


def cold_extraction_images_per_s(make_dm: Callable) -> float:
    """Images/s of the train split's extraction into an empty cache, from the call to the cached tensors."""
    with tempfile.TemporaryDirectory() as cache_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = make_dm(serve_features=served(cache_dir))  # the data side's extraction, as a fit runs it
        dm.setup("fit")
        dm.served_features.source  # its frozen backbone is built before the clock starts, as the raw side's is
        start = time.perf_counter()
        feats = dm.feature_matrices("train")
        return len(feats["targets"]) / (time.perf_counter() - start)


def raw_forward_images_per_s(image_size: int, batch_size: int, batches: int) -> float:
    """Images/s of the same extractor (same switches) on one in-memory batch, eval mode, ``no_grad``."""
    with tempfile.TemporaryDirectory() as cache_dir:
        model = make_model(cache_dir)
        model.configure_model()
        extractor = model.extractor.eval()
        x = torch.randn(batch_size, 3, image_size, image_size)
        if getattr(model, "_channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            extractor(x)  # warm-up
            start = time.perf_counter()
            for _ in range(batches):
                extractor(x)
        return batches * batch_size / (time.perf_counter() - start)


def bench_extraction(image_size: int = 224, batch_size: int = 32, rounds: int = 2) -> list:
    from bench.perf_common import Row, interleaved

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make_dm in jpeg_datamodules(Path(tmp), image_size, batch_size):
            dm = make_dm()
            dm.setup("fit")
            images = len(dm.split_dataset("train", deterministic=True))
            batches = max(2, images // batch_size)
            res = interleaved({"raw forward": lambda: raw_forward_images_per_s(image_size, batch_size, batches),
                               "cold extraction": lambda: cold_extraction_images_per_s(make_dm)}, rounds)
            per_round = [e / r for e, r in zip(res["cold extraction"], res["raw forward"])]
            ratio = statistics.median(per_round)
            extraction, forward = (statistics.median(res[k]) for k in ("cold extraction", "raw forward"))
            rows.append(Row("extraction", f"{name}: cold feature extraction / raw forward of tf_efficientnet_lite0 "
                            f"({images} images, {image_size} px, batch {batch_size}, {dm.num_workers} loader "
                            f"worker(s), {torch.get_num_threads()} thread(s))", extraction, forward, "img/s", ratio,
                            ">= 0.9", "per round: " + ", ".join(f"{r:.3f}" for r in per_round), ratio >= 0.9))
            print(f"  {rows[-1].name}: {ratio:.3f}", flush=True)
    return rows
