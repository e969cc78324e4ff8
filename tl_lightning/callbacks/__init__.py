"""Trainer callbacks: run results (table, metrics.json, plots) and checkpoint selection."""
from tl_lightning.callbacks.feature_plot import FeaturePlot
from tl_lightning.callbacks.predictions import PredictionWriter
from tl_lightning.callbacks.results import BestCheckpoint, ResultsWriter
from tl_lightning.callbacks.unfreeze import (
    LPFT, Freeze, FreezeUnfreeze, Gradual, Milestones, NoFreeze, UnfreezeStrategy,
)

__all__ = [
    "BestCheckpoint", "FeaturePlot", "Freeze", "FreezeUnfreeze", "Gradual", "LPFT", "Milestones", "NoFreeze",
    "PredictionWriter", "ResultsWriter", "UnfreezeStrategy",
]
