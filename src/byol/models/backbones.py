"""Encoders f (docs/method.md §2): torchvision ResNets with a width multiplier and a CIFAR stem.

The blocks are torchvision's own (``BasicBlock``, ``Bottleneck``); only the stem and the channel
widths are ours, because torchvision's ``ResNet`` hard-codes 64/128/256/512 channels and the paper
scales all of them (ResNet-50 2x/4x, as in SimCLR). At ``width=1`` with the ImageNet stem the
parameter names and shapes match ``torchvision.models.resnetNN`` exactly, so torchvision weights
load into it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from byol.models.norms import Affine, norm_layer, standardize_convs

# name -> (block, layers per stage). ResNet-200 is the paper's largest encoder (§2).
RESNET_SPECS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
    "resnet200": (Bottleneck, (3, 24, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet-v1 encoder without classifier: images [B, 3, H, W] -> representation y [B, D].

    D = 512 * width (ResNet-18/34) or 2048 * width (ResNet-50 and deeper); ``feature_dim`` says
    which. ``cifar_stem`` swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution,
    the usual adaptation to 32-px images (docs/method.md §2).
    """

    def __init__(
        self,
        block: type[nn.Module],
        layers: tuple[int, int, int, int],
        *,
        width: float = 1.0,
        cifar_stem: bool = False,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width must be > 0, got {width}")
        planes = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0], 1, norm_layer)
        self.layer2 = self._make_layer(block, planes[1], layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(block, planes[2], layers[2], 2, norm_layer)
        self.layer4 = self._make_layer(block, planes[3], layers[3], 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes[3] * block.expansion
        self.zero_init_residual = zero_init_residual
        self.reset_parameters()

    def _make_layer(self, block, planes, blocks, stride, norm_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        # Bottleneck's inner width is planes * base_width / 64; base_width=64 keeps it = planes.
        stage = [block(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def reset_parameters(self) -> None:
        """torchvision's ResNet initialisation (also used to draw an independent target)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, Affine)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
        if self.zero_init_residual:  # the last norm of each residual block starts at 0
            for m in self.modules():
                last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
                if getattr(last, "weight", None) is not None:
                    nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet(name: str, *, width: float = 1.0, cifar_stem: bool = False, norm: str = "bn",
           zero_init_residual: bool = False) -> ResNet:
    """Build ``name`` (one of RESNET_SPECS) at ``width``; see :class:`ResNet`. ``norm``: "bn"
    (the paper), "gn_ws" (GroupNorm + weight-standardised convolutions), "none", or "affine" (the
    structure left by the BN-free init, ``norms.remove_batchnorm``)."""
    if name not in RESNET_SPECS:
        raise ValueError(
            f"model.backbone: unknown backbone {name!r} (choose from {', '.join(RESNET_SPECS)})"
        )
    block, layers = RESNET_SPECS[name]
    net = ResNet(block, layers, width=width, cifar_stem=cifar_stem, norm_layer=norm_layer(norm),
                 zero_init_residual=zero_init_residual)
    return standardize_convs(net) if norm == "gn_ws" else net
