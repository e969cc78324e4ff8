"""Checkpoints of a model with a frozen pretrained backbone, without the backbone's tensors.

A ``FeatureExtraction`` checkpoint used to hold its frozen backbone in full at every epoch end (13.5 MB for
EfficientNet-Lite0, about 100 MB for a ResNet-50) to store a head of a few kB. The model rebuilds that backbone
from its own arguments (``backbone``, ``weights``) whenever it is built, so the checkpoint keeps only the
backbone's identity (``weights_id``: a hash of every tensor, BatchNorm statistics included). Loading refills the
tensors from the rebuilt backbone once the identities agree; a model built with other weights stops with one
sentence instead of pairing the head with features it was not trained on. A backbone built with ``weights: none``
(a seeded random initialisation) cannot be rebuilt from its arguments and is stored in full.

Lightning calls ``on_load_checkpoint`` before it loads the state dict, both when a fit resumes and in
``load_from_checkpoint``; code that loads a checkpoint's ``state_dict`` by hand calls ``on_load_checkpoint`` first.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from tl_lightning.errors import TLError

#: the checkpoint entry that replaces the backbone's tensors
KEY = "frozen_backbone"


def _prefix(owner: nn.Module, backbone: nn.Module) -> str:
    """The state-dict prefix of ``backbone`` inside ``owner`` (e.g. ``extractor.model.``)."""
    for name, module in owner.named_modules():
        if module is backbone:
            return name + "."
    raise TLError("the frozen backbone is not a submodule of the model; cannot checkpoint it by reference.")


def drop_backbone(checkpoint: dict, owner: nn.Module, backbone: nn.Module, name: str, weights: str,
                  identity: Callable[[], str]) -> None:
    """Remove ``backbone``'s tensors from ``checkpoint['state_dict']`` and record what rebuilds it (``identity()``:
    the hash of its weights, computed only when the backbone is dropped)."""
    if weights == "none":
        return  # a random initialisation is only reproducible from its tensors
    prefix = _prefix(owner, backbone)
    state = checkpoint["state_dict"]
    dropped = [key for key in state if key.startswith(prefix)]
    for key in dropped:
        del state[key]
    checkpoint[KEY] = {"backbone": name, "weights": weights, "weights_id": identity(), "tensors": len(dropped)}


def refill_backbone(checkpoint: dict, owner: nn.Module, backbone: nn.Module, identity: Callable[[], str]) -> None:
    """Put the rebuilt ``backbone``'s tensors back into ``checkpoint['state_dict']`` after checking that they are
    the ones the checkpoint was written with (no-op, and no hashing, for a checkpoint that holds its backbone)."""
    recorded = checkpoint.get(KEY)
    if not recorded:
        return
    built = identity()
    if recorded["weights_id"] != built:
        raise TLError(f"this checkpoint was trained on {recorded['backbone']} with weights '{recorded['weights']}' "
                      f"(identity {recorded['weights_id']}), but the model was built with other backbone weights "
                      f"(identity {built}); build it with --model.backbone={recorded['backbone']} "
                      f"--model.weights={recorded['weights']}.")
    prefix = _prefix(owner, backbone)
    checkpoint["state_dict"].update({prefix + key: tensor for key, tensor in backbone.state_dict().items()})
