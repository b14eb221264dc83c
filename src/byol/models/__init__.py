"""Encoders, heads and the BYOL module."""
from byol.models.backbones import RESNET_SPECS, ResNet, resnet
from byol.models.byol import BYOL, normalized_std
from byol.models.heads import MLPHead

__all__ = ["BYOL", "MLPHead", "RESNET_SPECS", "ResNet", "normalized_std", "resnet"]
