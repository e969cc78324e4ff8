"""Named off-the-shelf recipes, and ``recipe: auto``: the read-out, normalisation and head chosen on validation.

A recipe is a read-out (``penultimate`` features, Razavian et al. 2014, or ``fne``, the full-network embedding
of Garcia-Gasulla et al. 2018 over every conv layer), optional L2 normalisation (``l2``) and a full-batch head:
``logistic`` (L-BFGS, L2 strength swept on val) or ``svm`` (squared hinge, C swept on val). Names join the
parts with ``+``: ``penultimate+logistic``, ``fne+l2+svm``, ...

``auto`` (``select_recipe``) reads each read-out's served features (the DataModule extracts them once, with
``tta_views`` > 1 averaged over the views), fits every candidate's sweep on the train split, scores it on val (accuracy, or mAP for
multi-label data) and keeps the best; ties go to the earlier candidate in ``CANDIDATES``. The chosen
candidate is then refitted on train+val at its chosen strength (Kornblith et al. 2019's protocol, applied
to the choice of recipe as well as to the strength).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tl_lightning.errors import TLError
from tl_lightning.methods.shallow_heads import RowSpace, Sweep, row_space, sweep_logistic, sweep_svm

AUTO = "auto"
#: the layers of the full-network embedding: every conv layer, as Garcia-Gasulla et al. 2018 pool them
FNE_LAYERS = "every_conv"
#: standardised FNE features are discretised to -1 below the first threshold, 1 above the second, else 0
FNE_THRESHOLDS = (-0.25, 0.15)


@dataclass(frozen=True)
class Recipe:
    """A read-out (``penultimate`` or ``fne``), L2 normalisation or not, and a full-batch head."""

    readout: str
    l2: bool
    head: str

    @property
    def name(self) -> str:
        return "+".join([self.readout] + (["l2"] if self.l2 else []) + [self.head])

    @property
    def layers(self) -> str:
        return FNE_LAYERS if self.readout == "fne" else "penultimate"

    @property
    def embedding(self) -> str:
        return "fne" if self.readout == "fne" else "pooled"


#: the candidates of ``auto``, in the order that breaks ties (simplest first)
CANDIDATES = tuple(Recipe(readout, l2, head) for readout in ("penultimate", "fne") for l2 in (False, True)
                   for head in ("logistic", "svm"))
RECIPES = {r.name: r for r in CANDIDATES}


def parse_recipe(name: Optional[str]) -> Optional[Recipe]:
    """``None`` (the explicit layers/embedding/head arguments apply), ``auto`` -> None, or a named recipe."""
    if name is None or name == AUTO:
        return None
    if name not in RECIPES:
        raise TLError(f"unknown recipe '{name}'; choose {AUTO} or one of {', '.join(RECIPES)} (--model.recipe).")
    return RECIPES[name]


def fne_statistics(train_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation of the training split (the FNE's standardisation)."""
    return train_features.mean(0), train_features.std(0).clamp(min=1e-6)


def embed(raw: torch.Tensor, fne_stats: Optional[tuple[torch.Tensor, torch.Tensor]], l2: bool) -> torch.Tensor:
    """Raw read-out -> what the head sees: FNE (standardise, discretise to {-1, 0, 1}) if given, then L2."""
    x = raw
    if fne_stats is not None:
        mean, std = fne_stats
        x = (x - mean) / std
        lo, hi = FNE_THRESHOLDS
        x = (x > hi).to(x.dtype) - (x < lo).to(x.dtype)
    if l2:
        x = F.normalize(x, dim=1)
    return x


def sweep_head(head: str, x_train, y_train, x_val, y_val, *, num_classes: int, multilabel: bool,
               reg_grid, c_grid, max_iter: int, space: Optional[RowSpace] = None) -> Sweep:
    """The head's regularisation sweep: fitted on train, scored on val (``space``: ``row_space(x_train)``)."""
    task = dict(num_classes=num_classes, multilabel=multilabel, max_iter=max_iter, space=space)
    if head == "svm":
        return sweep_svm(x_train, y_train, x_val, y_val, grid=c_grid, **task)
    return sweep_logistic(x_train, y_train, x_val, y_val, grid=reg_grid, **task)


def select_recipe(module, train_split: dict, val_split: dict) -> tuple[Recipe, dict, Sweep]:
    """Score every candidate of ``CANDIDATES`` on val with the served features of the train and val splits
    (``{read-out: [N, D], 'targets'}``); return the best, the ``recipe_selection`` record and the best
    candidate's sweep (its train fit seeds the train+val refit)."""
    started = time.perf_counter()
    task = dict(num_classes=module.num_classes, multilabel=module.multilabel, reg_grid=module.reg_grid,
                c_grid=module.svm_c_grid, max_iter=module.lbfgs_max_iter)
    rows, best = [], None
    for readout in dict.fromkeys(r.readout for r in CANDIDATES):
        key = next(r.layers for r in CANDIDATES if r.readout == readout)
        train = {"features": train_split[key], "targets": train_split["targets"]}
        val = {"features": val_split[key], "targets": val_split["targets"]}
        stats = fne_statistics(train["features"]) if readout == "fne" else None
        for l2 in (False, True):  # one embedding and row space per L2 flag, shared by its heads
            x_train, x_val = embed(train["features"], stats, l2), embed(val["features"], stats, l2)
            space = row_space(x_train)
            for recipe in (r for r in CANDIDATES if r.readout == readout and r.l2 == l2):
                sweep = sweep_head(recipe.head, x_train, train["targets"], x_val, val["targets"], space=space,
                                   **task)
                rows.append({"recipe": recipe.name, "val_score": sweep.best_score, sweep.param: sweep.best_reg,
                             "feature_dim": int(x_train.shape[1])})
                if best is None or sweep.best_score > best[1].best_score:
                    best = (recipe, sweep)
    recipe, sweep = best  # type: ignore[misc]
    selection = {"chosen": recipe.name, "metric": "val/mAP" if module.multilabel else "val/acc",
                 "val_score": sweep.best_score, "candidates": rows, "tta_views": module.tta_views,
                 "seconds": round(time.perf_counter() - started, 3),
                 "protocol": "each candidate's sweep fitted on train and scored on val; the best refitted on "
                             "train+val"}
    return recipe, selection, sweep
