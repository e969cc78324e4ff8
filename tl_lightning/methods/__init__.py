"""The four ways of transferring, one LightningModule each; shared behaviour lives in ``base``."""
from tl_lightning.methods.adaptation import DomainAdaptation
from tl_lightning.methods.base import TransferModule
from tl_lightning.methods.feature_extraction import FeatureExtraction
from tl_lightning.methods.finetune import FineTune
from tl_lightning.methods.incremental import ICaRL

__all__ = ["DomainAdaptation", "FeatureExtraction", "FineTune", "ICaRL", "TransferModule"]
