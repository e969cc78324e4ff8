"""Small CNNs for 32x32 digits: the MNIST architecture of Ganin & Lempitsky (DANN, ICML 2015).

Registered in timm's model registry, so they are created, configured and grouped exactly like any timm model
(``timm.create_model('digit_cnn')``); both are meant to be trained from scratch (``weights=none``):

* ``digit_cnn_dann`` - the paper's network as published, without normalisation layers. Use it for domain
  adaptation: BatchNorm's running statistics are the source domain's, and applied to MNIST-M they cut a
  source-only model from about 56% to about 25% (measured; ``bench/adaptation.py``).
* ``digit_cnn`` - the same layers with BatchNorm, which trains faster within one domain (class-incremental
  learning, feature-extraction tests), and adapts best with per-domain statistics
  (``DomainAdaptation(domain_batchnorm=True)``).
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models import register_model

DIGIT_CNN_CFG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "num_classes": 10,
    "first_conv": "conv1",
    "classifier": "classifier",
    "architecture": "digit_cnn",
}


class DigitCNN(nn.Module):
    """conv(32,5)-pool-conv(48,5)-pool-fc(100)-fc(100)-classifier (Ganin & Lempitsky 2015), BatchNorm optional."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.5, batch_norm: bool = True,
                 architecture: str = "digit_cnn", **_):
        super().__init__()
        self.pretrained_cfg = dict(DIGIT_CNN_CFG, architecture=architecture)
        self.default_cfg = self.pretrained_cfg
        self.num_classes = num_classes
        self.num_features = 100

        def norm(channels: int, dims: int) -> nn.Module:
            if not batch_norm:
                return nn.Identity()
            return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)

        self.conv1 = nn.Sequential(nn.Conv2d(in_chans, 32, 5), norm(32, 2), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(32, 48, 5), norm(48, 2), nn.Dropout2d(0.1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveMaxPool2d(5)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(48 * 25, 100), norm(100, 1), nn.ReLU(inplace=True), nn.Dropout(drop_rate),
            nn.Linear(100, 100), norm(100, 1), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(100, num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            {"num_chs": 32, "reduction": 2, "module": "conv1"},
            {"num_chs": 48, "reduction": 2, "module": "conv2"},
        ]

    def group_matcher(self, coarse: bool = False):
        return {"stem": r"^conv1", "blocks": [(r"^conv2", (0,)), (r"^fc", (1,))]}

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, *_, **__) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv2(self.conv1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(architecture: str, batch_norm: bool, **kwargs) -> DigitCNN:
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    return DigitCNN(batch_norm=batch_norm, architecture=architecture, **kwargs)


@register_model
def digit_cnn(pretrained: bool = False, **kwargs) -> DigitCNN:
    """Ganin & Lempitsky's MNIST network with BatchNorm (one-domain training)."""
    return _create("digit_cnn", True, **kwargs)


@register_model
def digit_cnn_dann(pretrained: bool = False, **kwargs) -> DigitCNN:
    """Ganin & Lempitsky's MNIST network as published, no normalisation layers (domain adaptation)."""
    return _create("digit_cnn_dann", False, **kwargs)
