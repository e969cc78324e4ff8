"""LightningDataModules, one file per data set; shared behaviour lives in ``base``."""
from tl_lightning.data.base import TLDataModule
from tl_lightning.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule", "TLDataModule"]
