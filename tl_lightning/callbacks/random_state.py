"""The random number generators travel in every checkpoint, so a resumed ``fit`` draws the same data order,
augmentations and dropout masks as the run that was never stopped.

Lightning's checkpoints hold the model, the optimizers and the loops, not the generators: a run resumed from the
end of epoch k (``last.ckpt``) would otherwise shuffle epoch k+1 from the freshly seeded state of a new process,
and its learning curve would drift from the uninterrupted run's. The states are saved with ``last.ckpt`` (written
at the end of an epoch) and put back when the checkpoint is restored. Everything is a tensor or a tuple of ints,
so the checkpoint still loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import lightning as L

from tl_lightning.rng import capture_generators, restore_generators


class RandomState(L.Callback):
    """Saves Python's, NumPy's and torch's (CPU and CUDA) generator states in the checkpoint; restores them."""

    def state_dict(self) -> dict:
        return capture_generators()

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return  # a checkpoint written before the generators were saved: nothing to restore
        restore_generators(state_dict)
