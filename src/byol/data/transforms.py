"""The transforms the config's ``augment`` section asks for (docs/method.md §3, §5).

``view_specs``: the ViewSpecs of T and T', built from the fields ``Augment`` shares with
``ViewSpec`` by name (``augment.semantics`` among them, docs/fidelity.md); ``make_views``: what
the loader workers do to each image; ``make_eval_transform``: the deterministic centre crop of
evaluation, in the run's ``augment.semantics``. The device half of the batched backend is
``byol.data.pipeline.DeviceViews``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from byol.augment.views import CropFlip, TwoViews, ViewSpec, eval_transform, two_view_transform

if TYPE_CHECKING:
    from byol.config import Augment

# Fields given per view in the config, as (T, T') pairs; every other field shared by name with
# ViewSpec applies to both views. ViewSpec fields the config lacks keep ViewSpec's defaults.
PER_VIEW_FIELDS = ("blur_prob", "solarize_prob")


def view_specs(aug: Augment) -> tuple[ViewSpec, ViewSpec]:
    """The ViewSpecs of T and T' that ``aug`` describes."""
    spec_fields = {f.name for f in dataclasses.fields(ViewSpec)} - set(PER_VIEW_FIELDS)
    shared = {f.name: getattr(aug, f.name) for f in dataclasses.fields(aug) if f.name in spec_fields}
    t1, t2 = (ViewSpec(**shared, **{name: getattr(aug, name)[view] for name in PER_VIEW_FIELDS})
              for view in (0, 1))
    return t1, t2


def make_views(aug: Augment) -> Callable:
    """What the workers do to each image. ``reference``: all of T and T' (float views);
    ``batched``: crop + flip only (``CropFlip``: uint8 views in torchvision semantics, float32 in
    [0, 1] in official semantics), the rest runs on the device per batch
    (``byol.data.pipeline.DeviceViews``, applied by ``TrainBatches``)."""
    t1, t2 = view_specs(aug)
    if aug.backend == "batched":
        return TwoViews(CropFlip(t1), CropFlip(t2))
    return two_view_transform(t1, t2)


def eval_crop_fraction(size: int) -> float:
    """Centre crop 224/256 for large images (docs/method.md §5); none for small ones like CIFAR."""
    return 0.875 if size > 64 else 1.0


def make_eval_transform(aug: Augment) -> Callable:
    """The evaluation transform of a run whose config has ``aug``: its size, mean and std, and its
    ``augment.semantics`` (official: the release's centre crop and resize, docs/fidelity.md)."""
    size = aug.eval_px  # augment.eval_size, else augment.size
    return eval_transform(size, crop_fraction=eval_crop_fraction(size), mean=aug.mean, std=aug.std,
                          semantics=aug.semantics)
