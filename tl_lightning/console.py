"""One place for console output that is expected and tells a tl_lightning user nothing; real warnings stay.

Silenced, each for the reason given:

- Lightning's own use of a deprecated torch pytree API (``LeafSpec``): not the user's code, nothing to change;
- "You have overridden ``on_after_batch_transfer``": the methods move and augment batches themselves on purpose;
- "Found N module(s) in eval mode": frozen backbones (feature extraction, frozen fine-tuning groups, a teacher)
  are kept in eval mode by design, so their BatchNorm statistics stay the pretrained ones;
- Lightning's "Tip" advertising a cloud logger;
- the tensorboardX notice (where TensorBoard is not installed, ``logger: true`` writes CSV, as documented);
- the model summary's FLOPs column and "Total FLOPs: 0" (``CompactModelSummary``).
"""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichModelSummary

EXPECTED_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"You have overridden `on_after_batch_transfer` in `LightningModule` but have passed in a `LightningDataModule`",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency",
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


class CompactModelSummary(RichModelSummary):
    """Lightning's model summary without its FLOPs column and total: Lightning counts FLOPs only with an
    ``example_input_array``, which no method defines, so both read 0 ("Total FLOPs: 0"). The CLI installs it in
    place of Lightning's own summary; ``--trainer.enable_model_summary=false`` still turns it off (``enabled``)."""

    def __init__(self, max_depth: int = 1, enabled: bool = True):
        super().__init__(max_depth=max_depth)
        self.enabled = enabled

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.enabled:
            super().on_fit_start(trainer, pl_module)

    @staticmethod
    def summarize(summary_data, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: dict, total_flops: int, **summarize_kwargs) -> None:
        from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs" or total_flops]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        table.add_column(" ", style="dim")
        for name, _ in columns[1:]:
            table.add_column(name, justify="left" if name in ("Name", "Type", "Mode") else "right")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        lines = [f"Trainable params: {get_human_readable_count(int(trainable_parameters))}",
                 f"Non-trainable params: {get_human_readable_count(int(total_parameters - trainable_parameters))}",
                 f"Total params: {get_human_readable_count(int(total_parameters))}",
                 f"Total estimated model params size (MB): {get_formatted_model_size(model_size)}",
                 f"Modules in train mode: {total_training_modes['train']}",
                 f"Modules in eval mode: {total_training_modes['eval']}"]
        if total_flops:
            lines.append(f"Total FLOPs: {get_human_readable_count(total_flops)}")
        console = get_console()
        console.print(table)
        console.print("\n".join(lines))
