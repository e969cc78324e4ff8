"""Feature read-outs of a timm backbone: the penultimate layer, chosen layers, and layer groups.

Off-the-shelf features (Razavian et al. 2014) read the penultimate layer. The full-network embedding
(Garcia-Gasulla et al. 2018) reads the spatial mean of every convolutional layer (``every_conv``). Named
read-outs (``READOUTS``), for EfficientNet-Lite0:

* ``penultimate``: the globally pooled input of the classifier (1280-d);
* ``all``: timm's ``feature_info`` levels (the stages it exposes for dense prediction: blocks 0, 1, 2, 4, 6;
  blocks 3 and 5 are not among them) plus the penultimate layer (1792-d);
* ``every_block``: the output of every block (timm's fine layer groups, 16 blocks) plus the penultimate
  layer (3088-d);
* ``every_conv``: every convolution's output after its normalisation (and activation, where timm fuses it into
  ``BatchNormAct2d``): 49 layers, 21008-d; the last one is the conv head, whose mean is the penultimate layer.

Taps are averaged over space as the forward pass runs, so no full-resolution map is kept.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from tl_lightning.errors import TLError

PENULTIMATE = "penultimate"
READOUTS = (PENULTIMATE, "all", "every_block", "every_conv")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def stage_names(model: nn.Module) -> list[str]:
    """Module names of the backbone's stages, from timm's ``feature_info``."""
    info = getattr(model, "feature_info", None) or []
    names = [f["module"] for f in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    return [n.replace("_", ".") if n not in dict(model.named_modules()) else n for n in names]


def block_names(model: nn.Module) -> list[str]:
    """Module names of every block: timm's fine layer groups, without the stem and the head."""
    modules = dict(model.named_modules())
    groups = [g for g in layer_groups(model) if g != "stem" and g in modules]
    return [g for g in groups if not isinstance(modules[g], nn.Conv2d)]  # a lone conv is the stem or head


def conv_names(model: nn.Module) -> list[str]:
    """Every convolution in registration (forward) order, read after the normalisation layer that directly
    follows it in its parent, if any."""
    modules = dict(model.named_modules())
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d):
            continue
        parent_name, _, own = name.rpartition(".")
        siblings = [n for n, _ in modules[parent_name].named_children()]
        follower = siblings[siblings.index(own) + 1] if siblings.index(own) + 1 < len(siblings) else None
        if follower is not None and isinstance(getattr(modules[parent_name], follower), _NORMS):
            name = f"{parent_name}.{follower}" if parent_name else follower
        names.append(name)
    return names


def is_convnet(module: nn.Module) -> bool:
    """A convolutional network (a spatial convolution) without attention blocks: what ``channels_last: auto``
    turns NHWC on for."""
    spatial_conv = any(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in module.modules())
    attention = any(isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__
                    for m in module.modules())
    return spatial_conv and not attention


def readout_key(layers: list[str] | str | None) -> str:
    """The name a read-out is served under: its ``READOUTS`` name, or its module names joined by commas."""
    if layers is None:
        return PENULTIMATE
    return layers if isinstance(layers, str) else ",".join(layers)


def resolve_layers(model: nn.Module, layers: list[str] | str | None) -> list[str]:
    """A read-out name (``READOUTS``) or module names -> the module names to tap (``penultimate`` included)."""
    if layers is None or layers == PENULTIMATE:
        return [PENULTIMATE]
    if layers == "all":
        return stage_names(model) + [PENULTIMATE]
    if layers == "every_block":
        return block_names(model) + [PENULTIMATE]
    if layers == "every_conv":
        names = conv_names(model)
        if not names:
            raise TLError(f"{model.__class__.__name__} has no convolutional layer; use layers: every_block or all.")
        return names
    return [layers] if isinstance(layers, str) else list(layers)


class FeatureExtractor(nn.Module):
    """Concatenated, spatially averaged features of ``layers`` (a name of ``READOUTS`` or module names)."""

    def __init__(self, model: nn.Module, layers: list[str] | str | None = None):
        super().__init__()
        self.model = model
        self.training = model.training  # a new read-out of a frozen (eval) backbone must not put it in train mode
        layers = resolve_layers(model, layers)
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name != PENULTIMATE and name not in modules]
        if unknown:
            raise TLError(
                f"unknown feature layer(s) {unknown}; choose one of {', '.join(READOUTS)} or module names such "
                f"as {stage_names(model)}."
            )
        self.layers = list(layers)
        self._taps: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._hooks = [modules[name].register_forward_hook(self._tap(name))
                       for name in self.layers if name != PENULTIMATE]

    def remove_hooks(self) -> None:
        """Detach this read-out from the backbone (another extractor on the same model takes over)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _tap(self, name: str):
        def hook(_module, _inputs, output):
            self._taps[name] = _pooled(output)
        return hook

    def parts(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tapped layer's spatially averaged output, by name, from one forward pass."""
        self._taps.clear()
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        out = {name: _pooled(pooled) if name == PENULTIMATE else self._taps[name] for name in self.layers}
        self._taps.clear()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.parts(x)
        return torch.cat([parts[name] for name in self.layers], dim=1)


class ReadoutSet(nn.Module):
    """Several read-outs of one backbone from a single forward pass: ``{read-out name: [B, D]}``, each equal to
    its own ``FeatureExtractor``'s output (the same tapped tensors)."""

    def __init__(self, model: nn.Module, readouts: dict[str, list[str] | str]):
        super().__init__()
        self.names = {key: resolve_layers(model, layers) for key, layers in readouts.items()}
        self.reader = FeatureExtractor(model, list(dict.fromkeys(n for names in self.names.values() for n in names)))

    def remove_hooks(self) -> None:
        self.reader.remove_hooks()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = self.reader.parts(x)
        return {key: torch.cat([parts[n] for n in names], dim=1) for key, names in self.names.items()}


@torch.no_grad()
def conv_feature_dim(model: nn.Module) -> int:
    """Width of the flattened ``forward_features`` output (the last conv block) at the model's configured input
    size (timm's ``pretrained_cfg``)."""
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    was_training = model.training
    model.eval()
    dim = model.forward_features(torch.zeros(1, *size)).flatten(1).shape[1]
    model.train(was_training)
    return dim


def _pooled(out: torch.Tensor) -> torch.Tensor:
    """Spatial mean of a feature map ([N, C, ...] -> [N, C]); vectors are flattened."""
    return out.flatten(2).mean(-1) if out.ndim > 2 else out.flatten(1)


def layer_groups(model: nn.Module, coarse: bool = False) -> "OrderedDict[str, list[str]]":
    """Parameter names per layer group, from the model's own ``group_matcher`` (timm), input to output.

    Groups are named after their first module (``stem``, ``blocks.0.0``, ..., ``conv_head``); the classifier
    is not included (it is the task head). ``coarse=True`` uses timm's coarse grouping (whole stages) and names
    each group by the text its matcher matched (``stem``, ``blocks.0``, ..., ``blocks.6``; ``layer1``...).
    """
    from timm.models import group_parameters

    classifier = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    named = [n for n, _ in model.named_parameters() if not n.startswith(classifiers)]
    if not hasattr(model, "group_matcher"):
        raise TLError(f"{model.__class__.__name__} has no timm group_matcher; layer groups cannot be derived.")
    matcher = model.group_matcher(coarse=coarse)
    grouped = group_parameters(model, matcher, reverse=False)
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for _gid, names in sorted(grouped.items()):
        names = [n for n in names if n in named]
        if not names:
            continue
        first = names[0]
        if _gid == 0 and _matches_stem(matcher, first):
            label = "stem"
        else:
            label = (_matched_label(matcher, first) if coarse else None) or _group_label(first)
        while label in groups:
            label += "+"
        groups[label] = names
    return groups


def _matches_stem(matcher, name: str) -> bool:
    stem = matcher.get("stem") if isinstance(matcher, dict) else None
    return bool(stem and isinstance(stem, str) and re.match(stem, name))


def _matched_label(matcher, param_name: str) -> str | None:
    """The text of ``param_name`` that a dict ``group_matcher``'s regex matched (``blocks.5``), if any."""
    if not isinstance(matcher, dict):
        return None
    for spec in matcher.values():
        patterns = [spec] if isinstance(spec, str) else [p[0] for p in spec or []]
        for pattern in patterns:
            hit = re.match(pattern, param_name)
            if hit and hit.group(0).strip("."):
                return hit.group(0).strip(".")
    return None


def _group_label(param_name: str) -> str:
    parts = param_name.split(".")
    # "blocks.5.0.conv.weight" -> "blocks.5.0"; "conv_head.weight" -> "conv_head"
    keep = [parts[0]] + [p for p in parts[1:-1] if p.isdigit()][:2]
    return ".".join(keep)
