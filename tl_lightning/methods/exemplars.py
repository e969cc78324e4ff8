"""The exemplar memory of iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert, "iCaRL: Incremental Classifier and
Representation Learning", CVPR 2017): herding selection, the memory budget and the nearest-mean-of-exemplars
classifier.

* **Herding** (Alg. 4): with L2-normalised features ``φ`` and the class mean ``μ``, exemplar ``k`` is the sample
  that brings the mean of the chosen exemplars closest to ``μ``:
  ``p_k = argmin_x || μ - (φ(x) + Σ_{j<k} φ(p_j)) / k ||``. The result is an *ordered* list, so reducing a
  class's set (Alg. 5) keeps a prefix.
* **Budget**: a total ``K`` split over the ``t`` classes seen, ``m = floor(K / t)`` each, the remainder
  ``K mod t`` given one extra exemplar to the earliest classes (never above ``K``), or a fixed count per class.
* **NME** (Alg. 1): a sample goes to the class whose exemplar mean (of L2-normalised features, renormalised)
  is nearest to its own L2-normalised feature.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from tl_lightning.errors import TLError


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """Positions (into ``features``) of ``m`` exemplars chosen by herding, in selection order (iCaRL Alg. 4).

    ``features`` are L2-normalised here; each sample is chosen at most once. Every step scores all candidates
    at once: ``|| μ - (S + φ(x)) / k ||²`` for the running sum ``S`` of the chosen features.
    """
    phi = F.normalize(features.float(), dim=1)
    n = phi.shape[0]
    m = min(int(m), n)
    mu = phi.mean(0)
    chosen = torch.empty(m, dtype=torch.long)
    taken = torch.zeros(n, dtype=torch.bool)
    running = torch.zeros_like(mu)
    for k in range(1, m + 1):
        dist = ((mu - (running + phi) / k) ** 2).sum(1)
        dist[taken] = float("inf")
        best = int(torch.argmin(dist))
        chosen[k - 1] = best
        taken[best] = True
        running += phi[best]
    return chosen


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                flipped: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-class means of L2-normalised features, renormalised (iCaRL Alg. 1); with ``flipped`` (the features
    of the mirrored images) both views are averaged. Classes without samples get a zero row."""
    phi = F.normalize(features.float(), dim=1)
    if flipped is not None:
        phi = (phi + F.normalize(flipped.float(), dim=1)) / 2
    sums = torch.zeros(num_classes, phi.shape[1], dtype=phi.dtype, device=phi.device)
    sums.index_add_(0, labels.to(phi.device), phi)
    return F.normalize(sums, dim=1)


def nme_scores(features: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Scores ``-|| φ(x) - μ_y ||`` of the nearest-mean-of-exemplars classifier (argmax = nearest mean)."""
    phi = F.normalize(features.float(), dim=1)
    return -torch.cdist(phi, means.to(phi), p=2)


class ExemplarMemory:
    """Ordered exemplar lists per class (positions into the training set), under a total or per-class budget."""

    def __init__(self, budget: Optional[int] = 2000, per_class: Optional[int] = None):
        """
        Args:
            budget: total number of exemplars ``K`` (``m = floor(K / t)`` per class); 0 keeps no memory.
            per_class: a fixed number of exemplars per class; when set, it replaces the total budget.
        """
        if budget is None and per_class is None:
            raise TLError("the exemplar memory needs a total budget K or a per-class count; set "
                          "--model.memory_budget or --model.memory_per_class.")
        if (budget is not None and budget < 0) or (per_class is not None and per_class < 0):
            raise TLError("the exemplar memory size must be >= 0; fix --model.memory_budget/memory_per_class.")
        self.budget = None if per_class is not None else budget
        self.per_class = per_class
        self.exemplars: dict[int, np.ndarray] = {}

    # ----- sizes -------------------------------------------------------------------------------------------
    def sizes(self, classes: list[int]) -> dict[int, int]:
        """Exemplars allowed per class when ``classes`` (in class order) are in memory; the sum is at most K."""
        if self.per_class is not None:
            return {c: self.per_class for c in classes}
        t = len(classes)
        if t == 0:
            return {}
        m, extra = divmod(self.budget, t)
        return {c: m + (1 if i < extra else 0) for i, c in enumerate(classes)}

    def __len__(self) -> int:
        return sum(len(v) for v in self.exemplars.values())

    @property
    def classes(self) -> list[int]:
        return sorted(self.exemplars)

    # ----- updates -----------------------------------------------------------------------------------------
    def reduce(self, sizes: dict[int, int]) -> None:
        """Keep the first ``sizes[c]`` exemplars of each class (iCaRL Alg. 5: a prefix of the herding order)."""
        for c, m in sizes.items():
            if c in self.exemplars:
                self.exemplars[c] = self.exemplars[c][:m]

    def add(self, label: int, ordered_positions) -> None:
        """Store the herding-ordered exemplar positions of class ``label``."""
        self.exemplars[int(label)] = np.asarray(ordered_positions, dtype=np.int64)

    def positions(self, classes: Optional[list[int]] = None) -> np.ndarray:
        """All exemplar positions (of ``classes``), class by class."""
        keys = self.classes if classes is None else [c for c in classes if c in self.exemplars]
        if not keys:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([self.exemplars[c] for c in keys])

    # ----- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"budget": self.budget, "per_class": self.per_class,
                "exemplars": {int(c): v.tolist() for c, v in self.exemplars.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.exemplars = {int(c): np.asarray(v, dtype=np.int64) for c, v in state["exemplars"].items()}
