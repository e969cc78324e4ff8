"""LightningDataModules, one file per data set; shared behaviour lives in ``base``."""
from tl_lightning.data.base import TLDataModule
from tl_lightning.data.csv import CSVDataModule
from tl_lightning.data.cub200 import CUB200DataModule
from tl_lightning.data.digits import BlendedDigitsDataModule, DigitsDataModule
from tl_lightning.data.domains import DomainPairDataModule
from tl_lightning.data.flowers102 import Flowers102DataModule
from tl_lightning.data.image_folder import ImageFolderDataModule
from tl_lightning.data.mnist import MNISTDataModule
from tl_lightning.data.mnistm import MNISTMDataModule
from tl_lightning.data.svhn import SVHNDataModule
from tl_lightning.data.voc2007 import VOC2007DataModule

__all__ = [
    "BlendedDigitsDataModule", "CSVDataModule", "CUB200DataModule", "DigitsDataModule", "DomainPairDataModule",
    "Flowers102DataModule", "ImageFolderDataModule",
    "MNISTDataModule", "MNISTMDataModule", "SVHNDataModule", "TLDataModule", "VOC2007DataModule",
]
