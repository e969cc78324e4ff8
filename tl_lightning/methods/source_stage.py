"""The source stage of ``DomainAdaptation``: the source model its soft labels come from.

Tzeng et al. (2015, sec. 3.3) compute soft labels once, before adaptation, from a model trained on the source:
per class, the mean softmax at temperature τ of that model over the source examples of the class. The source
model is either a checkpoint of a ``source_only`` run (``load_source_model``) or trained in the first
``source_pretrain_epochs`` epochs of the same fit (``DomainAdaptation.source_stage_epochs``).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
from torch import nn

from tl_lightning.errors import TLError
from tl_lightning.losses import class_soft_labels
from tl_lightning.methods.domain_statistics import TARGET_PREFIX


def source_model(features: nn.Module, classifier: nn.Module) -> nn.Sequential:
    """A copy of ``classifier(features(x))`` as one module (under per-domain BatchNorm it normalises with the
    source statistics: the target's are read only inside ``target_statistics``)."""
    return nn.Sequential(copy.deepcopy(features), copy.deepcopy(classifier))


def load_source_model(path: str, features: nn.Module, classifier: nn.Module) -> nn.Sequential:
    """The source model (``features.*`` and ``classifier.*`` weights) of a DomainAdaptation checkpoint, in a copy
    of ``features`` and ``classifier``."""
    try:  # tensors and plain containers only: a checkpoint can not run code while it loads
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TLError(f"cannot read source_checkpoint '{path}' ({e.__class__.__name__}); pass a checkpoint "
                      "written by a tl_lightning source_only run (loaded with weights_only=True).") from e
    state = state.get("state_dict", state)
    model = source_model(features, classifier)
    wanted = {f"{i}.{k}": f"{prefix}.{k}" for i, (prefix, part) in
              enumerate((("features", features), ("classifier", classifier))) for k in part.state_dict()}
    for dst, src in list(wanted.items()):  # a source model without target statistics: the source's stand in
        if src not in state and TARGET_PREFIX in src:
            wanted[dst] = src.replace(TARGET_PREFIX, "")
    missing = [src for src in wanted.values() if src not in state]
    if missing:
        raise TLError(f"checkpoint '{path}' does not hold this model's weights ({missing[0]} is missing); "
                      "use a checkpoint of a DomainAdaptation source_only run with the same backbone.")
    try:
        model.load_state_dict({dst: state[src] for dst, src in wanted.items()})
    except RuntimeError as e:
        raise TLError(f"checkpoint '{path}' has other shapes than this model (another backbone or class "
                      "count?); use a source_only run of the same configuration.") from e
    return model


@torch.no_grad()
def source_soft_labels(read: Callable[[torch.Tensor], torch.Tensor], batches: Iterable, num_classes: int,
                       temperature: float, device: torch.device) -> torch.Tensor:
    """Per-class mean softmax at ``temperature`` of ``read`` (a source model's logits, in eval mode) over the
    source ``(x, y)`` batches."""
    logits, targets = [], []
    for x, y in batches:
        logits.append(read(x.to(device)).float().cpu())
        targets.append(y)
    return class_soft_labels(torch.cat(logits), torch.cat(targets), num_classes, temperature)
