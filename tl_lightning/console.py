"""One place for console output that is expected and tells a tl_lightning user nothing; real warnings stay.

Silenced, each for the reason given:

- Lightning's own use of a deprecated torch pytree API (``LeafSpec``): not the user's code, nothing to change;
- "You have overridden ``on_after_batch_transfer``": the methods move and augment batches themselves on purpose;
- "Found N module(s) in eval mode": frozen backbones (feature extraction, frozen fine-tuning groups, a teacher)
  are kept in eval mode by design, so their BatchNorm statistics stay the pretrained ones;
- Lightning's "Tip" advertising a cloud logger.
"""
from __future__ import annotations

import logging
import warnings

EXPECTED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    r"Found \d+ module\(s\) in eval mode at the start of training",
)
EXPECTED_LOG_PREFIXES = ("💡 Tip:",)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(EXPECTED_LOG_PREFIXES)


def quiet_expected_noise() -> None:
    """Install the filters (idempotent): Python warnings by message, Lightning's log lines by prefix."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    import lightning.pytorch  # noqa: F401  (sets up the "lightning.pytorch" handler first)

    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropExpected) for f in handler.filters):
            handler.addFilter(_DropExpected())
