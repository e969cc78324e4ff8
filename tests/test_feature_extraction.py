"""FeatureExtraction: a frozen backbone that never moves, served features (extracted once by the data side),
FNE and L2 embeddings, and the checks between the model and the features it is served."""
from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch

import pytest

from tl_lightning.data.base import ArraySource, TLDataModule
from tl_lightning.data.digits import DigitsDataModule
from tl_lightning.errors import TLError
from tl_lightning.methods.feature_extraction import FNE_THRESHOLDS, FeatureExtraction


def digits(serve: dict | None = None, **kw) -> DigitsDataModule:
    """Digits at 32 px; ``serve``: the model arguments whose features it serves, as the CLI links them."""
    kw.setdefault("image_size", 32)
    served = None if serve is None else FeatureExtraction.served_features(**serve)
    return DigitsDataModule(batch_size=128, num_workers=0, serve_features=served, **kw)


def trainer(epochs: int = 2) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def model(tmp_path, **kw) -> FeatureExtraction:
    kw.setdefault("lr", 0.01)
    return FeatureExtraction(num_classes=10, cache_dir=str(tmp_path / "cache"), **kw)


def served_by(tmp_path, **kw) -> dict:
    """The arguments of ``model(tmp_path, **kw)`` that decide its served features."""
    return dict(cache_dir=str(tmp_path / "cache"), **kw)


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
    dm = digits(served_by(tmp_path))
    fe = model(tmp_path)
    model_calls = ForwardCounter(fe.extractor.model)
    data_calls = ForwardCounter(dm.served_features.source.model)  # the data side's own copy extracts
    tr = trainer(epochs=4)
    tr.fit(fe, datamodule=dm)
    n_train, n_val = len(dm.split_dataset("train")), len(dm.split_dataset("val"))
    expected = math.ceil(n_train / dm.batch_size) + math.ceil(n_val / dm.batch_size)
    assert data_calls.calls == expected  # one pass over train and val, not four epochs' worth
    tr.test(fe, datamodule=dm)
    assert data_calls.calls == expected + math.ceil(len(dm.split_dataset("test")) / dm.batch_size)
    assert model_calls.calls == 0  # the model reads the served features, never images
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 3

    # Another head and learning rate: every split comes from the cache, no backbone runs.
    fe2, dm2 = model(tmp_path, lr=0.05, hidden_dim=32), digits(served_by(tmp_path))
    data_calls2 = ForwardCounter(dm2.served_features.source.model)
    tr2 = trainer(epochs=2)
    tr2.fit(fe2, datamodule=dm2)
    tr2.test(fe2, datamodule=dm2)
    assert data_calls2.calls == 0

    # A different transform (input size) is a different key: extraction runs again.
    dm3 = digits(served_by(tmp_path), image_size=40)
    data_calls3 = ForwardCounter(dm3.served_features.source.model)
    trainer(epochs=1).fit(model(tmp_path), datamodule=dm3)
    assert data_calls3.calls > 0


def test_served_features_equal_the_models_own_read_out_and_must_be_its_own(tmp_path):
    dm = digits(served_by(tmp_path, layers="every_block"), samples_per_class=5)
    fe = model(tmp_path, layers="every_block")
    dm.setup("fit")
    served = dm.feature_matrices("val")
    assert list(served) == ["every_block", "targets"]
    fe.configure_model()  # the layout a fit gives it (channels_last: auto), which the data side uses too
    with torch.no_grad():  # batch by batch as the data side reads them (a conv's sums depend on the batch shape)
        direct = torch.cat([fe.extractor(x.contiguous(memory_format=torch.channels_last))
                            for x, _ in dm.make_loader(dm.split_dataset("val", deterministic=True), shuffle=False)])
    assert torch.allclose(served["every_block"], direct, atol=1e-5)
    batch, targets = next(iter(dm.val_dataloader()))
    assert torch.equal(fe.raw_features(batch), served["every_block"][:len(targets)])
    assert torch.equal(targets, served["targets"][:len(targets)])
    with pytest.raises(TLError, match="serves read-outs \\['every_block'\\].*but the model reads \\['penultimate'\\]"):
        trainer(1).fit(model(tmp_path), datamodule=dm)
    other = digits(served_by(tmp_path, layers="every_block", weights=str(_digit_checkpoint(tmp_path))))
    with pytest.raises(TLError, match="other weights than the model's backbone"):
        trainer(1).fit(model(tmp_path, layers="every_block"), datamodule=other)
    with pytest.raises(TLError, match="the svm head needs the DataModule to serve the backbone's features"):
        trainer(1).fit(model(tmp_path, head="svm"), datamodule=digits())


def _digit_checkpoint(tmp_path):
    """Bundled EfficientNet-Lite0 weights with one tensor changed: other weights, the same architecture."""
    from tl_lightning.backbones import create_backbone

    state = create_backbone("tf_efficientnet_lite0", "bundled", num_classes=0).state_dict()
    state["conv_stem.weight"] = state["conv_stem.weight"] * 1.01
    torch.save(state, tmp_path / "other.pt")
    return tmp_path / "other.pt"


def test_cold_cache_warm_cache_and_no_cache_train_the_same_head(tmp_path):
    # Extracting draws from torch's generator (a DataLoader draws its seed); the cache keeps the generators
    # where they were, so a run that extracted and one that found the features train bit-identical heads.
    heads, metrics = [], []
    for folder, cache in (("shared", True), ("shared", True), ("off", False)):  # cold, warm, no cache
        L.seed_everything(3)
        fe = model(tmp_path / folder, cache=cache)
        tr = trainer(epochs=2)
        tr.fit(fe, datamodule=digits(served_by(tmp_path / folder, cache=cache)))
        heads.append(fe.head.weight.detach().clone())
        metrics.append(tr.test(fe, datamodule=digits(served_by(tmp_path / folder, cache=cache)),
                               verbose=False)[0]["test/acc"])
    assert len(list((tmp_path / "shared" / "cache" / "features").glob("*.pt"))) == 3
    assert not (tmp_path / "off" / "cache").exists()
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], heads[2])
    assert metrics[0] == metrics[1] == metrics[2]


def test_full_network_embedding_standardises_and_discretises(tmp_path):
    dm = digits(served_by(tmp_path, embedding="fne"))
    fe = model(tmp_path, embedding="fne")
    # the paper's choice: every conv layer (49 in EfficientNet-Lite0), read after its BatchNorm + activation
    assert len(fe.extractor.layers) == 49 and fe.feature_dim == 21008
    assert fe.extractor.layers[0] == "bn1" and fe.extractor.layers[-1] == "bn2"
    trainer(epochs=1).fit(fe, datamodule=dm)
    train = dm.feature_matrices("train")["every_conv"]
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
    dm = _TinyMultiLabel(batch_size=32, num_workers=0, image_size=32, val_fraction=0.2,
                         serve_features=FeatureExtraction.served_features(cache_dir=str(tmp_path)))
    fe = FeatureExtraction(num_classes=3, multilabel=True, lr=0.05, cache_dir=str(tmp_path))
    assert fe.monitor == ("val/mAP", "max")
    tr = trainer(epochs=8)
    tr.fit(fe, datamodule=dm)
    result = tr.test(fe, datamodule=dm, verbose=False)[0]
    assert result["test/mAP"] > 0.9  # colour channels are trivially separable


def test_every_read_out_comes_from_one_pass_and_equals_its_own_extraction(tmp_path):
    """``recipe: auto`` is served both candidate read-outs; one forward pass per image gives both, and each is
    bit-identical to an extraction of that read-out alone (so a cache entry means the same either way)."""
    dm = digits(served_by(tmp_path / "both", recipe="auto"), samples_per_class=5)
    dm.setup("fit")
    calls = ForwardCounter(dm.served_features.source.model)
    both = dm.feature_matrices("val")
    assert set(both) == {"penultimate", "every_conv", "targets"}
    assert calls.calls == math.ceil(len(dm.split_dataset("val")) / dm.batch_size)
    for layers in ("penultimate", "every_conv"):
        alone = digits(served_by(tmp_path / layers, layers=layers), samples_per_class=5)
        alone.setup("fit")
        one = alone.feature_matrices("val")
        assert list(one) == [layers, "targets"]
        assert torch.equal(one[layers], both[layers]) and torch.equal(one["targets"], both["targets"])
