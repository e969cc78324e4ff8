"""The four ways of transferring, one LightningModule each; shared behaviour lives in ``base``."""
from tl_lightning.methods.base import TransferModule
from tl_lightning.methods.feature_extraction import FeatureExtraction

__all__ = ["FeatureExtraction", "TransferModule"]
