"""tl_lightning: transfer learning recipes on PyTorch Lightning."""

__version__ = "0.1.0"
