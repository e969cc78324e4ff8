"""Feature read-outs of a timm backbone: the penultimate layer, chosen stages, and layer groups.

The full-network embedding (Garcia-Gasulla et al. 2018) reads the spatial mean of every stage's output;
off-the-shelf features (Razavian et al. 2014) read the penultimate layer.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from tl_lightning.errors import TLError

PENULTIMATE = "penultimate"


def stage_names(model: nn.Module) -> list[str]:
    """Module names of the backbone's stages, from timm's ``feature_info``."""
    info = getattr(model, "feature_info", None) or []
    names = [f["module"] for f in (info.get_dicts() if hasattr(info, "get_dicts") else info)]
    return [n.replace("_", ".") if n not in dict(model.named_modules()) else n for n in names]


class FeatureExtractor(nn.Module):
    """Concatenated, spatially averaged features of ``layers`` (module names, ``penultimate`` or ``all``)."""

    def __init__(self, model: nn.Module, layers: list[str] | str | None = None):
        super().__init__()
        self.model = model
        if layers is None or layers == PENULTIMATE:
            layers = [PENULTIMATE]
        elif layers == "all":
            layers = stage_names(model) + [PENULTIMATE]
        elif isinstance(layers, str):
            layers = [layers]
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name != PENULTIMATE and name not in modules]
        if unknown:
            raise TLError(
                f"unknown feature layer(s) {unknown}; choose '{PENULTIMATE}', 'all' or module names such as "
                f"{stage_names(model)}."
            )
        self.layers = list(layers)
        self._taps: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name in self.layers:
            if name != PENULTIMATE:
                modules[name].register_forward_hook(self._tap(name))

    def _tap(self, name: str):
        def hook(_module, _inputs, output):
            self._taps[name] = output
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._taps.clear()
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        outputs = []
        for name in self.layers:
            out = pooled if name == PENULTIMATE else self._taps[name]
            outputs.append(out.flatten(2).mean(-1) if out.ndim > 2 else out.flatten(1))
        self._taps.clear()
        return torch.cat(outputs, dim=1)


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
