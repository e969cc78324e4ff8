"""Backbones: bundled ImageNet weights, weight sources, data configs and clear errors."""
from __future__ import annotations


import pytest
import timm
import torch
from PIL import Image

from tl_lightning.backbones import FeatureExtractor, create_backbone, data_config, layer_groups
from tl_lightning.backbones.bundled import bundled_weights_path
from tl_lightning.errors import TLError

# Top-5 ImageNet logits of skimage's chelsea (a tabby cat) under the bundled EfficientNet-Lite0, timm's
# eval transform (224 px, bicubic, crop 0.875, mean/std 0.5). Recorded once from the mapped weights.
CHELSEA_TOP5 = [282, 285, 281, 287, 904]
CHELSEA_LOGITS = [9.2356, 9.1381, 8.3953, 5.9227, 3.4109]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", weights="bundled", num_classes=None).eval()


def chelsea_batch() -> torch.Tensor:
    import skimage.data
    from timm.data import create_transform

    return create_transform(**data_config("tf_efficientnet_lite0"))(Image.fromarray(skimage.data.chelsea())).unsqueeze(0)


def test_bundled_tensors_are_loaded_unchanged_in_order(lite0):
    source = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    target = lite0.state_dict()
    assert len(source) == len(target) == 296
    for (tk, tv), (sk, sv) in zip(target.items(), source.items()):
        assert torch.equal(tv, sv), (tk, sk)


def test_bundled_weights_give_reference_logits_and_classify_chelsea_as_cat(lite0):
    with torch.no_grad():
        logits = lite0(chelsea_batch())[0]
    values, indices = logits.topk(5)
    assert indices.tolist() == CHELSEA_TOP5
    assert torch.allclose(values, torch.tensor(CHELSEA_LOGITS), atol=2e-3)
    assert int(logits.argmax()) in CAT_CLASSES


def test_data_config_follows_timm():
    cfg = data_config("tf_efficientnet_lite0")
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    assert data_config("tf_efficientnet_lite0", image_size=96)["input_size"] == (3, 96, 96)
    assert data_config("digit_cnn")["input_size"] == (3, 32, 32)
    assert data_config("resnet18")["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_a_fixed_input_size_backbone_refuses_another_image_size_with_one_sentence():
    """ViTs take one input size (timm's ``fixed_input_size``): the shipped FE configs' 288 px must not reach one."""
    assert data_config("vit_tiny_patch16_224", image_size=224)["input_size"] == (3, 224, 224)
    assert data_config("resnet18", image_size=288)["input_size"] == (3, 288, 288)  # convnets take any size
    with pytest.raises(TLError, match=r"vit_tiny_patch16_224 takes only 224 px inputs .* set "
                                      r"--data.image_size=null for the backbone's own size\.$"):
        data_config("vit_tiny_patch16_224", image_size=288)
    from tl_lightning.data import ImageFolderDataModule

    with pytest.raises(TLError, match="takes only 224 px"):  # at construction, before any run folder exists
        ImageFolderDataModule(data_dir="unused", backbone="vit_tiny_patch16_224", image_size=288)


def test_any_timm_model_and_the_digit_cnns_are_backbones():
    for name in ("resnet18", "digit_cnn", "digit_cnn_dann"):
        model = create_backbone(name, weights="none")
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, model.num_features)


def test_digit_cnn_dann_is_the_published_network_without_normalisation():
    """Ganin & Lempitsky's MNIST network: same layers as digit_cnn, no BatchNorm (source statistics)."""
    def norm_layers(model):
        return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    plain, with_bn = timm.create_model("digit_cnn_dann"), timm.create_model("digit_cnn")
    assert not norm_layers(plain) and len(norm_layers(with_bn)) == 4
    convs = [(m.in_channels, m.out_channels, m.kernel_size) for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [(3, 32, (5, 5)), (32, 48, (5, 5))]
    linears = [(m.in_features, m.out_features) for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [(1200, 100), (100, 100), (100, 10)]
    assert plain.pretrained_cfg["architecture"] == "digit_cnn_dann"


def test_local_checkpoint_round_trip(tmp_path, lite0):
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in lite0.state_dict().items()}}, path)
    loaded = create_backbone("tf_efficientnet_lite0", weights=str(path), num_classes=0)
    own = loaded.state_dict()
    for k, v in lite0.state_dict().items():
        if not k.startswith("classifier"):
            assert torch.equal(own[k], v), k


def test_unknown_backbone_is_one_clear_sentence():
    with pytest.raises(TLError, match=r"unknown backbone 'resnet5O'.*Did you mean 'resnet50'"):
        create_backbone("resnet5O")


def test_missing_weight_file_and_wrong_bundled_model():
    with pytest.raises(TLError, match="neither one of bundled, hub, none nor an existing checkpoint"):
        create_backbone("resnet18", weights="/nonexistent/weights.pth")
    with pytest.raises(TLError, match="weights='bundled' exists only for 'tf_efficientnet_lite0'"):
        create_backbone("resnet18", weights="bundled")


def test_unreachable_hub_is_one_clear_sentence(monkeypatch):
    import huggingface_hub.constants

    # what a machine without network sees, without waiting for connection time-outs (read at import time)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TLError, match="could not fetch hub weights for 'resnet18'"):
        create_backbone("resnet18", weights="hub")


def test_feature_extractor_reads_penultimate_and_stages(lite0):
    model = create_backbone("tf_efficientnet_lite0", weights="bundled", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pen = FeatureExtractor(model)(x)
        full = FeatureExtractor(model, "all")(x)
        direct = model(x)
    assert torch.allclose(pen, direct)
    assert full.shape[1] == 16 + 24 + 40 + 112 + 320 + 1280
    assert torch.allclose(full[:, -1280:], direct)
    with pytest.raises(TLError, match="unknown feature layer"):
        FeatureExtractor(model, ["blocks.99"])


def test_layer_groups_cover_every_backbone_parameter_in_order(lite0):
    groups = layer_groups(lite0)
    names = [n for ns in groups.values() for n in ns]
    expected = [n for n, _ in lite0.named_parameters() if not n.startswith("classifier")]
    assert sorted(names) == sorted(expected)
    assert next(iter(groups)) == "stem"
