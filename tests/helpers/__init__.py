"""Helpers shared by tests (importable as ``helpers.X`` inside pytest, ``tests.helpers.X`` from the repo root)."""
