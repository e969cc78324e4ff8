"""FeatureExtraction: a frozen backbone that never moves, the feature cache, FNE and L2 embeddings."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

from tl_lightning.data.base import ArraySource, TLDataModule
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.methods.feature_extraction import FNE_THRESHOLDS, FeatureExtraction


def digits(**kw) -> DigitsDataModule:
    kw.setdefault("image_size", 32)
    return DigitsDataModule(batch_size=128, num_workers=0, **kw)


def trainer(epochs: int = 2) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def model(tmp_path, **kw) -> FeatureExtraction:
    kw.setdefault("lr", 0.01)
    return FeatureExtraction(num_classes=10, cache_dir=str(tmp_path / "cache"), **kw)


class ForwardCounter:
    """Counts backbone forwards via the stem convolution (timm models call forward_features, not __call__)."""

    def __init__(self, backbone: torch.nn.Module):
        self.calls = 0
        stem = backbone.get_submodule(backbone.pretrained_cfg["first_conv"])
        stem.register_forward_hook(self)

    def __call__(self, *_):
        self.calls += 1


def test_backbone_is_bit_identical_after_training_on_augmented_images(tmp_path):
    dm = digits(augment=True, samples_per_class=12)  # images reach the step: the backbone really runs in it
    fe = model(tmp_path, cache=False)
    before = {k: v.clone() for k, v in fe.extractor.model.state_dict().items()}
    bn = next(m for m in fe.extractor.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    modes = []
    bn.register_forward_pre_hook(lambda m, _: modes.append(m.training))
    head_before = fe.head.weight.clone()
    trainer(2).fit(fe, datamodule=dm)
    after = fe.extractor.model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"backbone tensor {k} changed"
    assert modes and not any(modes), "backbone BatchNorm ran in training mode"
    assert not torch.equal(head_before, fe.head.weight), "the head did not train"
    assert all(not p.requires_grad for p in fe.extractor.parameters())


def test_backbone_runs_once_per_image_for_a_fit_and_never_on_a_second_run(tmp_path):
    dm = digits()
    fe = model(tmp_path)
    counter = ForwardCounter(fe.extractor.model)
    tr = trainer(epochs=4)
    tr.fit(fe, datamodule=dm)
    n_train, n_val = len(dm.split_dataset("train")), len(dm.split_dataset("val"))
    expected = math.ceil(n_train / dm.batch_size) + math.ceil(n_val / dm.batch_size)
    assert counter.calls == expected  # one pass over train and val, not four epochs' worth
    tr.test(fe, datamodule=dm)
    assert counter.calls == expected + math.ceil(len(dm.split_dataset("test")) / dm.batch_size)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3

    # Another head and learning rate: every split comes from the cache, the backbone never runs.
    fe2 = model(tmp_path, lr=0.05, hidden_dim=32)
    counter2 = ForwardCounter(fe2.extractor.model)
    tr2 = trainer(epochs=2)
    tr2.fit(fe2, datamodule=digits())
    tr2.test(fe2, datamodule=digits())
    assert counter2.calls == 0

    # A different transform (input size) is a different key: extraction runs again.
    fe3 = model(tmp_path)
    counter3 = ForwardCounter(fe3.extractor.model)
    trainer(epochs=1).fit(fe3, datamodule=digits(image_size=40))
    assert counter3.calls > 0


def test_cold_cache_warm_cache_and_no_cache_train_the_same_head(tmp_path):
    # Extracting draws from torch's generator (a DataLoader draws its seed); the cache keeps the generators
    # where they were, so a run that extracted and one that found the features train bit-identical heads.
    heads, metrics = [], []
    for folder, cache in (("shared", True), ("shared", True), ("off", False)):  # cold, warm, no cache
        L.seed_everything(3)
        fe = model(tmp_path / folder, cache=cache)
        tr = trainer(epochs=2)
        tr.fit(fe, datamodule=digits())
        heads.append(fe.head.weight.detach().clone())
        metrics.append(tr.test(fe, datamodule=digits(), verbose=False)[0]["test/acc"])
    assert len(list((tmp_path / "shared" / "cache" / "features").glob("*.pt"))) == 3
    assert not (tmp_path / "off" / "cache").exists()
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], heads[2])
    assert metrics[0] == metrics[1] == metrics[2]


def test_full_network_embedding_standardises_and_discretises(tmp_path):
    dm = digits()
    fe = model(tmp_path, embedding="fne")
    # the paper's choice: every conv layer (49 in EfficientNet-Lite0), read after its BatchNorm + activation
    assert len(fe.extractor.layers) == 49 and fe.feature_dim == 21008
    assert fe.extractor.layers[0] == "bn1" and fe.extractor.layers[-1] == "bn2"
    trainer(epochs=1).fit(fe, datamodule=dm)
    train = fe.cached_features("train", dm.split_dataset("train", deterministic=True))["features"]
    assert torch.allclose(fe.fne_mean, train.mean(0), atol=1e-5)
    assert torch.allclose(fe.fne_std, train.std(0).clamp(min=1e-6), rtol=1e-4)
    emb = fe.embed(train)
    assert set(torch.unique(emb).tolist()) <= {-1.0, 0.0, 1.0}
    z = (train - train.mean(0)) / train.std(0).clamp(min=1e-6)
    lo, hi = FNE_THRESHOLDS
    assert torch.equal(emb == 1, z > hi) and torch.equal(emb == -1, z < lo)


def test_l2_normalised_embedding(tmp_path):
    fe = model(tmp_path, l2_normalize=True, layers=["blocks.4", "penultimate"])
    x = torch.randn(4, 3, 32, 32)
    emb = fe.features(x)
    assert emb.shape[1] == 112 + 1280
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)


class _TinyMultiLabel(TLDataModule):
    multilabel = True

    @property
    def classes(self):
        return ["red", "green", "blue"]

    def build_split(self, split):
        if split != "train":
            return None
        rng = np.random.default_rng(0)
        targets = rng.integers(0, 2, size=(90, 3)).astype(np.float32)
        images = (targets[:, None, None, :] * 200 + rng.integers(0, 40, size=(90, 8, 8, 3))).astype(np.uint8)
        targets[0, 1] = -1  # an ignored label (like a VOC "difficult"-only class)
        return ArraySource(images, targets, name="tiny-multilabel")


def test_multilabel_targets_train_and_report_map(tmp_path):
    dm = _TinyMultiLabel(batch_size=32, num_workers=0, image_size=32, val_fraction=0.2)
    fe = FeatureExtraction(num_classes=3, multilabel=True, lr=0.05, cache_dir=str(tmp_path))
    assert fe.monitor == ("val/mAP", "max")
    tr = trainer(epochs=8)
    tr.fit(fe, datamodule=dm)
    result = tr.test(fe, datamodule=dm, verbose=False)[0]
    assert result["test/mAP"] > 0.9  # colour channels are trivially separable
