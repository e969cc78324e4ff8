"""Per-domain BatchNorm statistics: every BatchNorm layer keeps a second set of running statistics for the target
domain and shares its affine weights with the source (AdaBN, Li et al. 2016; domain-specific batch normalisation,
Chang et al. CVPR 2019, without the per-domain affine).

Training normalises each domain's batch with its own batch statistics (one forward per domain) and updates that
domain's running statistics; evaluation on a domain reads that domain's running statistics.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

SOURCE, TARGET = 0, 1  # domain labels
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
TARGET_PREFIX = "target_"


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def add_target_statistics(module: nn.Module) -> int:
    """Give every BatchNorm layer of ``module`` target running statistics (``target_running_mean``, ...; copies of
    the current ones, saved in checkpoints). Returns the number of layers."""
    layers = batchnorm_layers(module)
    for bn in layers:
        for name in STATISTICS:
            bn.register_buffer(TARGET_PREFIX + name, getattr(bn, name).clone())
    return len(layers)


def seed_target_statistics(module: nn.Module) -> None:
    """Copy the source statistics into every layer whose target statistics have never been updated (a warm start
    from a source-trained model)."""
    with torch.no_grad():
        for bn in batchnorm_layers(module):
            if int(getattr(bn, TARGET_PREFIX + "num_batches_tracked")) == 0:
                for name in STATISTICS:
                    getattr(bn, TARGET_PREFIX + name).copy_(getattr(bn, name))


def _swap(layers: list[nn.Module]) -> None:
    for bn in layers:
        for name in STATISTICS:
            source, target = getattr(bn, name), getattr(bn, TARGET_PREFIX + name)
            setattr(bn, name, target)
            setattr(bn, TARGET_PREFIX + name, source)


@contextlib.contextmanager
def target_statistics(module: nn.Module, active: bool = True) -> Iterator[None]:
    """Within the block the BatchNorm layers of ``module`` read and update the target's running statistics."""
    layers = [bn for bn in batchnorm_layers(module) if hasattr(bn, TARGET_PREFIX + "running_mean")] if active else []
    _swap(layers)
    try:
        yield
    finally:
        _swap(layers)
