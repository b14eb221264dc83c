"""Encoders f (docs/method.md §2): torchvision ResNets with a width multiplier and a CIFAR stem.

The blocks are torchvision's own (``BasicBlock``, ``Bottleneck``); only the stem and the channel
widths are ours, because torchvision's ``ResNet`` hard-codes 64/128/256/512 channels and the paper
scales all of them (ResNet-50 2x/4x, as in SimCLR). At ``width=1`` with the ImageNet stem the
parameter names and shapes match ``torchvision.models.resnetNN`` exactly, so torchvision weights
load into it.

``padding="same"`` pads every strided convolution and the stem's max pool as TensorFlow's "SAME"
does, what the released BYOL weights were trained with (docs/fidelity.md): output size
ceil(n / stride), and the odd pixel of padding at the bottom/right, where torchvision's symmetric
padding puts one on each side and crops the input differently. Parameters and state-dict names are
the same either way, so only the numerics differ.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.models.resnet import BasicBlock, Bottleneck

from byol.models.norms import Affine, WSConv2d, norm_layer, standardize_convs

PADDINGS = ("symmetric", "same")

# name -> (block, layers per stage). ResNet-200 is the paper's largest encoder (§2).
RESNET_SPECS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
    "resnet200": (Bottleneck, (3, 24, 36, 3)),
}


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one spatial dim: (before, after) for an input of ``size``.

    out = ceil(size / stride); total = max((out - 1) * stride + effective kernel - size, 0);
    before = total // 2, after = the rest (the extra pixel goes at the bottom/right)."""
    eff = (kernel - 1) * dilation + 1
    rest = size % stride  # (out - 1) * stride + eff - size depends on size % stride only
    total = max(eff - (stride if rest == 0 else rest), 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1),
             value: float = 0.0) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H + pad_h, W + pad_w], padded with ``value`` as "SAME" needs for a
    window ``kernel`` at ``stride``, from the actual H and W (any input size)."""
    # Under torch.compile the pads depend on H, W through one guard on their parity (same_padding).
    # A dynamic batch size is fine; for several image sizes compile with dynamic=False: inductor's
    # CPU code generation stalls on symbolic spatial sizes here (torch 2.14).
    h, w = x.shape[-2], x.shape[-1]
    top, bottom = same_padding(h, kernel[0], stride[0], dilation[0])
    left, right = same_padding(w, kernel[1], stride[1], dilation[1])
    if not (top or bottom or left or right):
        return x
    return F.pad(x, (left, right, top, bottom), value=value)


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with "SAME" padding computed from each input (:func:`pad_same`); built with
    ``padding=0``. Same parameters and state-dict names as nn.Conv2d."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(pad_same(x, self.kernel_size, self.stride, self.dilation), weight, bias)


class SameWSConv2d(WSConv2d):
    """WSConv2d (weight standardisation) with "SAME" padding, as :class:`SameConv2d`."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(pad_same(x, self.kernel_size, self.stride, self.dilation), weight, bias)


class SameMaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d with "SAME" padding (padded with -inf, so the padding never wins: TensorFlow's
    max pool ignores padded positions); built with ``padding=0``. [B, C, H, W] ->
    [B, C, ceil(H / stride), ceil(W / stride)]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = _pair(self.kernel_size), _pair(self.stride)
        return F.max_pool2d(pad_same(x, k, s, value=float("-inf")), k, s, 0, self.dilation, self.ceil_mode)


def use_same_padding(module: nn.Module) -> nn.Module:
    """Turn ``module``'s strided convolutions and max pools into their "SAME" variants in place
    (parameters kept). Stride-1 convolutions with odd kernels that pad (k - 1) / 2 on each side
    already pad as "SAME" does and are left as they are."""
    for m in module.modules():
        same_already = (max(m.stride) == 1 and all(k % 2 for k in m.kernel_size)
                        and m.padding == tuple((k - 1) // 2 * d for k, d in zip(m.kernel_size, m.dilation))
                        ) if isinstance(m, nn.Conv2d) else False
        if isinstance(m, nn.Conv2d) and not same_already:
            if type(m) not in (nn.Conv2d, WSConv2d, SameConv2d, SameWSConv2d):
                raise TypeError(f"padding=same: cannot convert a {type(m).__name__}")
            m.__class__ = SameWSConv2d if isinstance(m, WSConv2d) else SameConv2d
            m.padding = (0, 0)
        elif isinstance(m, nn.MaxPool2d):
            m.__class__ = SameMaxPool2d
            m.padding = 0
    return module


class ResNet(nn.Module):
    """ResNet-v1 encoder without classifier: images [B, 3, H, W] -> representation y [B, D].

    D = 512 * width (ResNet-18/34) or 2048 * width (ResNet-50 and deeper); ``feature_dim`` says
    which. ``cifar_stem`` swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution,
    the usual adaptation to 32-px images (docs/method.md §2).

    ``zero_init_residual``: the last norm scale (gamma) of every residual block (``bn3`` of a
    Bottleneck, ``bn2`` of a BasicBlock) starts at 0, so each block starts as its shortcut: the
    init of the released BYOL code; the paper does not say, so it is off by default
    (docs/fidelity.md). The BN-free init (docs/method.md §8) uses it too.

    ``padding``: "symmetric" (torchvision's) or "same" (TensorFlow's, :func:`use_same_padding`).
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
        padding: str = "symmetric",
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"model.width must be > 0, got {width}")
        if padding not in PADDINGS:
            raise ValueError(f"model.padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
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
        self.padding = padding
        self.reset_parameters()
        if padding == "same":
            use_same_padding(self)

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
           zero_init_residual: bool = False, padding: str = "symmetric") -> ResNet:
    """Build ``name`` (one of RESNET_SPECS) at ``width``; see :class:`ResNet`. ``norm``: "bn"
    (the paper), "gn_ws" (GroupNorm + weight-standardised convolutions), "none", or "affine" (the
    structure left by the BN-free init, ``norms.remove_batchnorm``). ``padding``: "symmetric"
    (torchvision's) or "same" (TensorFlow's, the released weights'); ``zero_init_residual``: each
    block's last BN scale starts at 0 (the release's init)."""
    if name not in RESNET_SPECS:
        raise ValueError(
            f"model.backbone: unknown backbone {name!r} (choose from {', '.join(RESNET_SPECS)})"
        )
    block, layers = RESNET_SPECS[name]
    if padding not in PADDINGS:
        raise ValueError(f"model.padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    net = ResNet(block, layers, width=width, cifar_stem=cifar_stem, norm_layer=norm_layer(norm),
                 zero_init_residual=zero_init_residual)
    if norm == "gn_ws":
        standardize_convs(net)
    if padding == "same":  # after standardize_convs, which converts plain nn.Conv2d only
        use_same_padding(net)
        net.padding = padding
    return net
