"""Augmentations T and T' (docs/method.md §3). ``views``: the reference per-image torchvision path."""
from byol.augment.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViews,
    ViewSpec,
    blur_kernel_size,
    byol_view_specs,
    denormalize,
    eval_transform,
    geometric_ops,
    photometric_ops,
    two_view_transform,
    view_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TwoViews",
    "ViewSpec",
    "blur_kernel_size",
    "byol_view_specs",
    "denormalize",
    "eval_transform",
    "geometric_ops",
    "photometric_ops",
    "two_view_transform",
    "view_transform",
]
