"""Trainer callbacks: run results (table, metrics.json, plots) and checkpoint selection."""
from tl_lightning.callbacks.results import BestCheckpoint, ResultsWriter

__all__ = ["BestCheckpoint", "ResultsWriter"]
