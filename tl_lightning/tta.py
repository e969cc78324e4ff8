"""Deterministic test-time views (crops and flips) whose features are averaged: Razavian et al. 2014's "aug".

Each view is a fixed transform applied after the data module's eval transform, so every view has its own
``SampleSet`` fingerprint and its features are cached separately. The views, in the order they are used:

* with horizontal flips (photos): full, full flipped, then five crops (center, top-left, top-right,
  bottom-left, bottom-right) each followed by its mirror image - 12 at most (4 = full and center, both flipped);
* without flips (data modules with ``hflip = 0``, e.g. digits): full and the five crops - 6 at most.

A crop keeps ``crop`` of the image side and is resized back to the input size. ``ViewTransform`` works on one
CHW image or on an NCHW batch alike, so ``predict`` (which keeps images, not cached features) applies the very
same views to each batch (``batch_views``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from tl_lightning.errors import TLError

CROPS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


class ViewTransform:
    """Crop (``position`` at ``crop`` of the side, resized back) and/or flip a CHW image or an NCHW batch."""

    def __init__(self, position: str = "full", crop: float = 1.0, flip: bool = False):
        if position != "full" and position not in CROPS:
            raise TLError(f"unknown view position '{position}'; use 'full' or one of {', '.join(CROPS)}.")
        self.position = position
        self.crop = float(crop) if position != "full" else 1.0
        self.flip = bool(flip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.position != "full":
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * self.crop)), max(1, round(w * self.crop))
            top = {"center": (h - ch) // 2, "top_left": 0, "top_right": 0}.get(self.position, h - ch)
            left = {"center": (w - cw) // 2, "top_left": 0, "bottom_left": 0}.get(self.position, w - cw)
            patch = x[..., top:top + ch, left:left + cw]
            batch = patch if patch.ndim == 4 else patch.unsqueeze(0)
            x = F.interpolate(batch, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            x = x if patch.ndim == 4 else x.squeeze(0)
        if self.flip:
            x = torch.flip(x, dims=[-1])
        return x

    def __repr__(self) -> str:  # part of the data set fingerprint, hence of the cache key
        return f"ViewTransform(position={self.position}, crop={self.crop}, flip={self.flip})"


def view_specs(flips: bool) -> list[tuple[str, bool]]:
    """(position, flip) of every available view, in order of use."""
    if not flips:
        return [("full", False)] + [(c, False) for c in CROPS]
    return [(position, flip) for position in ("full",) + CROPS for flip in (False, True)]


def _check(views: int, flips: bool, crop: float) -> list[tuple[str, bool]]:
    specs = view_specs(flips)
    if views < 1 or views > len(specs):
        kind = "with flips" if flips else "without flips (this data set is not flipped)"
        raise TLError(f"tta_views must be between 1 and {len(specs)} {kind}; got {views}. Fix --model.tta_views.")
    if not 0 < crop < 1:
        raise TLError(f"tta_crop must be in (0, 1) (the share of the side a crop keeps); got {crop}.")
    return specs[:views]


def batch_views(views: int, flips: bool, crop: float = 0.875) -> list[Optional[ViewTransform]]:
    """The views of ``view_transforms`` for batches already through the eval transform (None = as is)."""
    return [None if position == "full" and not flip else ViewTransform(position, crop, flip)
            for position, flip in _check(views, flips, crop)]


def view_transforms(base: Optional[Callable], views: int, flips: bool, crop: float = 0.875) -> list[Callable]:
    """The first ``views`` deterministic transforms; view 0 is ``base`` itself (the plain eval transform)."""
    out = []
    for position, flip in _check(views, flips, crop):
        if position == "full" and not flip:
            out.append(base)
            continue
        view = ViewTransform(position, crop, flip)
        out.append(T.Compose([base, view]) if base is not None else view)
    return out
