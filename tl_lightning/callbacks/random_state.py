"""The random number generators travel in every checkpoint, so a resumed ``fit`` draws the same data order,
augmentations and dropout masks as the run that was never stopped.

Lightning's checkpoints hold the model, the optimizers and the loops, not the generators: a run resumed from the
end of epoch k (``last.ckpt``) would otherwise shuffle epoch k+1 from the freshly seeded state of a new process,
and its learning curve would drift from the uninterrupted run's. The states are saved with ``last.ckpt`` (written
at the end of an epoch) and put back when the checkpoint is restored. Everything is a tensor or a tuple of ints,
so the checkpoint still loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class RandomState(L.Callback):
    """Saves Python's, NumPy's and torch's (CPU and CUDA) generator states in the checkpoint; restores them."""

    def state_dict(self) -> dict:
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

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return  # a checkpoint written before the generators were saved: nothing to restore
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        n = state_dict["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
