"""Average precision as the PASCAL VOC devkit computes it, for multi-label classification.

Per class, samples are ranked by score (stable, so ties keep their order as in the devkit's MATLAB ``sort``),
samples whose target is -1 (VOC's "difficult") are ignored, and precision/recall are read down the ranking.

* ``voc07``: the VOC2007 11-point interpolated AP (Everingham et al., IJCV 2010, sec. 4.2): the mean over recall
  levels t in {0, 0.1, ..., 1} of the highest precision at recall >= t.
* ``area``: the area under the precision-recall curve, as the devkit computes it from VOC2010 on: precision is
  first made monotonically decreasing (each point takes the highest precision to its right), then summed over
  the recall steps.

Classes without a positive sample have no AP and are left out of the mean.
"""
from __future__ import annotations

from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Method = Literal["voc07", "area"]
RECALL_LEVELS = tuple(k / 10 for k in range(11))  # exact decimals, compared with a 1e-12 tolerance


def precision_recall(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision and recall after each ranked sample (targets 1 positive, 0 negative, -1 ignored)."""
    keep = targets >= 0
    scores, targets = scores[keep].double(), targets[keep]
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = (targets[order] > 0).double()
    tp = hits.cumsum(0)
    fp = (1 - hits).cumsum(0)
    return tp / (tp + fp), tp / hits.sum().clamp(min=1)


def average_precision(scores: torch.Tensor, targets: torch.Tensor, method: Method = "area") -> float:
    """AP of one class; NaN when it has no positive sample."""
    if not (targets > 0).any():
        return float("nan")
    precision, recall = precision_recall(scores, targets)
    if method == "voc07":
        total = 0.0
        for t in RECALL_LEVELS:
            reached = precision[recall >= t - 1e-12]
            total += reached.max().item() if len(reached) else 0.0
        return total / len(RECALL_LEVELS)
    if method != "area":
        raise ValueError(f"unknown AP method '{method}' (voc07 or area)")
    envelope = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * envelope).sum())


def per_class_average_precision(scores: torch.Tensor, targets: torch.Tensor, method: Method = "area") -> torch.Tensor:
    """AP of every column of (N, C) ``scores``/``targets``; NaN for a class without positives."""
    return torch.tensor([average_precision(scores[:, c], targets[:, c], method) for c in range(scores.shape[1])],
                        dtype=torch.float64)


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor, method: Method = "area") -> float:
    """Mean AP over the classes that have a positive sample (0 when none has)."""
    ap = per_class_average_precision(scores, targets, method)
    valid = ~torch.isnan(ap)
    return float(ap[valid].mean()) if valid.any() else 0.0


class MultilabelVOCAveragePrecision(Metric):
    """mAP over ``num_labels`` classes, ``method`` ``voc07`` (11-point) or ``area``; target -1 is ignored.

    ``update(scores, targets)`` takes (N, C) scores (logits or probabilities: AP only uses their order) and
    (N, C) targets in {1, 0, -1}."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_labels: int, method: Method = "area", **kwargs):
        super().__init__(**kwargs)
        if method not in ("voc07", "area"):
            raise ValueError(f"unknown AP method '{method}' (voc07 or area)")
        self.num_labels = num_labels
        self.method = method
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        if scores.shape != targets.shape or scores.ndim != 2 or scores.shape[1] != self.num_labels:
            raise ValueError(f"expected (N, {self.num_labels}) scores and targets, got {tuple(scores.shape)} and "
                             f"{tuple(targets.shape)}")
        self.scores.append(scores.detach().float())
        self.targets.append(targets.detach().to(torch.int8))

    def compute(self) -> torch.Tensor:
        if isinstance(self.scores, list) and not self.scores:
            return torch.tensor(0.0)
        scores, targets = dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.targets).cpu()
        return torch.tensor(mean_average_precision(scores, targets, self.method), dtype=torch.float32)
