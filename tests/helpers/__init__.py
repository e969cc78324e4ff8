"""Helpers shared by tests (importable as ``helpers.X`` inside pytest, ``tests.helpers.X`` from the repo root)."""
from .cli import FAST, REPO, read_metrics, run_cli  # noqa: F401  (the helpers every CLI test uses)
