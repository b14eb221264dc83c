"""Encoders, heads, the target strategies, the MoCo queue and the BYOL module."""
from byol.models.backbones import RESNET_SPECS, ResNet, resnet
from byol.models.byol import BYOL, ForwardOutput, normalized_std
from byol.models.heads import MLPHead
from byol.models.queue import NegativeQueue
from byol.models.targets import EMATarget, OnlineTarget, StopGradTarget

__all__ = ["BYOL", "RESNET_SPECS", "EMATarget", "ForwardOutput", "MLPHead", "NegativeQueue", "OnlineTarget",
           "ResNet", "StopGradTarget", "normalized_std", "resnet"]
