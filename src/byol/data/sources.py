"""The images a run reads: its raw dataset, its held-out split, and per-image wrappers.

``open_images`` gives ``(uint8 [3, H, W], label)`` from a folder, tar shards or the built-in shapes;
``heldout_split`` is the one split of those into training and held-out images that
pretraining (its kNN monitor) and every later evaluation use (docs/method.md §5);
``Transformed`` and ``ViewPairs`` apply a transform per image.
"""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from byol.config import Data
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset, split_per_class
from byol.data.shapes import ShapesDataset
from byol.data.shards import ShardDataset, is_shard_path


def open_images(data: Data, path: str | None = None) -> Dataset:
    """The raw dataset of ``data`` (uint8 [3,H,W], label): a folder, tar shards
    (``byol.data.shards.is_shard_path``) or the built-in shapes."""
    if data.dataset == "shapes" and path is None:
        return ShapesDataset(data.shapes_size, image_size=data.shapes_image_size, seed=data.seed,
                             colour=data.shapes_colour)
    path = path or data.path
    if not path:
        raise DataError("data.path: required when data.dataset=folder (or use data.dataset=shapes)")
    shards = data.format == "shards" or (data.format == "auto" and is_shard_path(path))
    kind = ShardDataset if shards else ImageFolderDataset
    return kind(
        path, bad_files=data.bad_files, verify=data.verify, limit=data.limit, seed=data.seed,
        max_pixels=data.max_pixels,
    )


def labels_of(ds: Dataset) -> list[int] | None:
    labels = getattr(ds, "labels", None)
    return list(labels) if labels is not None else None


def heldout_split(data: Data, images: Dataset) -> tuple[list[int], list[int]]:
    """The run's (training, held-out) indices of ``images`` (``open_images(data)``): per class,
    ``data.val_fraction`` held out with ``data.seed`` (``split_per_class``); unlabelled images or
    ``val_fraction=0`` hold out none. Pretraining and evaluation both split with this, so an
    evaluation's test images are exactly the ones the encoder never trained on."""
    labels = labels_of(images)
    if labels is None or data.val_fraction == 0:
        return list(range(len(images))), []
    return split_per_class(labels, data.val_fraction, data.seed)


class Transformed(Dataset):
    """Apply a transform to a dataset of (uint8 image, label): i -> (transform(image), label)."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


class ViewPairs(Dataset):
    """The pretraining views of a dataset of (uint8 image, label): i -> (view1, view2, label),
    ``views(image)`` giving the two (``byol.data.transforms.make_views``)."""

    def __init__(self, base: Dataset, views: Callable) -> None:
        self.base, self.views = base, views

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        v1, v2 = self.views(image)
        return v1, v2, label
