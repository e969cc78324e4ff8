"""Loggers: W&B that goes offline by itself, and CSV / TensorBoard loggers that a resumed run continues."""
from tl_lightning.loggers.continuing import CSVLogger, TensorBoardLogger
from tl_lightning.loggers.wandb_logger import (
    WandbLogger, has_api_key, place_loggers_in_run_dir, server_reachable, wandb_base_url, wandb_mode,
)

__all__ = ["CSVLogger", "TensorBoardLogger", "WandbLogger", "has_api_key", "place_loggers_in_run_dir",
           "server_reachable", "wandb_base_url", "wandb_mode"]
