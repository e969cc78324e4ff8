"""Feature cache (issue 15, item 6): a corrupt entry is dropped and re-extracted with one warning, and the key
notices changed inputs (file size and mtime_ns, crop-box values, every in-memory image, new weights)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tl_lightning.data.base import ArraySource, FileSource
from tl_lightning.feature_cache import FeatureCache, cache_key


def entry(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(256, 32, generator=g), "targets": torch.arange(256) % 10}


def test_a_bit_flip_is_caught_dropped_and_re_extracted(tmp_path):
    cache = FeatureCache(str(tmp_path))
    key = cache_key(test="bitflip")
    cache.save(key, entry(0))
    FeatureCache._memo.clear()  # a later process: read from disk
    path = cache.path(key)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40  # one flipped bit inside the tensor bytes
    open(path, "wb").write(bytes(data))
    calls = []

    def extract():
        calls.append(1)
        return entry(0)

    with pytest.warns(UserWarning, match="failed its checksum") as caught:
        value = cache.get_or_compute(key, extract)
    assert len([w for w in caught if "checksum" in str(w.message)]) == 1
    assert calls == [1] and torch.equal(value["features"], entry(0)["features"])
    assert not torch.isnan(value["features"]).any()
    FeatureCache._memo.clear()
    assert torch.equal(cache.load(key)["features"], entry(0)["features"])  # the rewritten entry is sound
    leftovers = [n for n in os.listdir(os.path.dirname(path)) if ".tmp" in n]
    assert leftovers == []


def test_truncated_entry_is_re_extracted(tmp_path):
    cache = FeatureCache(str(tmp_path))
    key = cache_key(test="truncated")
    cache.save(key, entry(1))
    FeatureCache._memo.clear()
    with open(cache.path(key), "r+b") as f:
        f.truncate(1000)
    with pytest.warns(UserWarning, match="failed its checksum"):
        assert cache.load(key) is None
    assert not os.path.exists(cache.path(key))


def images(folder, n=3):
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_file_source_key_sees_size_mtime_and_crop_box_values(tmp_path):
    paths = images(tmp_path)
    ident = FileSource(paths, [0, 1, 2]).identity()
    assert FileSource(paths, [0, 1, 2]).identity() == ident  # stable when nothing changed
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # touched: same bytes, newer mtime_ns
    touched = FileSource(paths, [0, 1, 2]).identity()
    assert touched != ident
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 9, 3), np.uint8)).save(paths[1])  # replaced
    assert FileSource(paths, [0, 1, 2]).identity() not in (ident, touched)
    boxes = [[0, 0, 4, 4]] * 3
    moved = [[0, 0, 4, 4], [1, 0, 4, 4], [0, 0, 4, 4]]
    assert FileSource(paths, [0, 1, 2], boxes).identity() != FileSource(paths, [0, 1, 2], moved).identity()


def test_array_source_key_covers_every_image():
    images_ = np.zeros((200, 8, 8), np.uint8)
    ident = ArraySource(images_, np.zeros(200), "digits").identity()
    changed = images_.copy()
    changed[1, 3, 3] = 1  # image 1: skipped by a sample of every 200 // 64 = 3rd image
    assert ArraySource(changed, np.zeros(200), "digits").identity() != ident


def test_weights_id_a_model_checks_is_recomputed_after_a_state_dict_is_loaded():
    from tl_lightning.backbones import weights_id
    from tl_lightning.methods.feature_extraction import FeatureExtraction

    model = FeatureExtraction(backbone="digit_cnn", weights="none", num_classes=10, cache=False)
    before = model.backbone_weights_id()
    fresh = FeatureExtraction(backbone="digit_cnn", weights="none", num_classes=10)
    assert before == weights_id(model.extractor.model) == weights_id(fresh.extractor.model)  # a fixed random init
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert model.backbone_weights_id() != before
