"""The process's random number generators (Python, NumPy, torch CPU and CUDA) as one state, to save and restore.

``RandomState`` puts this state in every checkpoint, so a resumed run draws what the uninterrupted run drew.
``generators_kept`` runs code that may draw (a DataLoader draws its workers' base seed from torch's generator)
without moving the generators: e.g. a feature extraction that is skipped when the cache is warm must leave the
run's later draws the same as a run that found the features in the cache. Everything in the state is a tensor
or a tuple of ints, so a checkpoint holding it still loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def capture_generators() -> dict:
    """The current state of every generator."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_generators(state: dict) -> None:
    """Put back a state from ``capture_generators`` (also one that went through a checkpoint)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def generators_kept() -> Iterator[None]:
    """Run the body, then put every generator back where it was, as if the body had drawn nothing."""
    state = capture_generators()
    try:
        yield
    finally:
        restore_generators(state)
