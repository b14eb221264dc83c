"""Datasets and loaders for pretraining and evaluation, with a resumable sampler.

Augmentations are seeded per sample from (seed, epoch, index): the views of image i in epoch e
are the same whatever the worker count, the order of loading or a stop and resume in the
middle of the epoch. That makes resume exact without saving worker RNG states.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from byol.augment.views import (
    CropFlip, TwoViews, ViewSpec, byol_view_specs, eval_transform, two_view_transform,
)
from byol.config import Augment, Config, Data
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset, split_per_class
from byol.data.shapes import ShapesDataset


class ResumableSampler(Sampler):
    """Seeded permutation per epoch, started at any position; yields (epoch, index) pairs.

    ``set_epoch(epoch, start)`` makes the next iteration yield the permutation of ``epoch`` from
    its ``start``-th element on: the sampler position a resume restores. Under DDP
    (``world_size`` > 1) every rank walks the same permutation in global batches of
    ``batch_size`` and takes its slice of each one, so one step of W ranks sees exactly the
    global batch a single process would (``start`` is then a multiple of ``batch_size``).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, *, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None) -> None:
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"optim.batch_size={batch_size} must be a multiple of the "
                             f"{world_size} processes")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def _indices(self) -> list[int]:
        perm = self.permutation(self.epoch)
        if self.world_size == 1:
            return perm[self.start :]
        b, per = self.batch_size, self.batch_size // self.world_size
        first = self.rank * per
        return [i for g in range(self.start // b, self.n // b)
                for i in perm[g * b + first : g * b + first + per]]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices():
            yield self.epoch, i

    def __len__(self) -> int:
        return len(self._indices())


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """The augmentation seed of sample ``i`` in ``epoch``: a fixed mix of the three, stable across
    processes and Python versions (unlike hash())."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xC2B2AE3D27D4EB4F + i) % 2**63


class SeededViews(Dataset):
    """(epoch, i) -> (view1, view2, label): two augmented views drawn from an RNG seeded by
    (seed, epoch, i). The global torch RNG is forked so the caller's stream is untouched."""

    def __init__(self, base: Dataset, views: Callable, seed: int) -> None:
        self.base, self.views, self.seed = base, views, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        image, label = self.base[i]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (torch.manual_seed would reseed CUDA too)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
            v1, v2 = self.views(image)
        return v1, v2, label


class Transformed(Dataset):
    """Apply a deterministic transform to a dataset of (uint8 image, label)."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, label = self.base[i]
        return self.transform(image), label


@dataclass
class PretrainData:
    """The pretraining views plus, for labelled data, kNN bank (train split) and test split."""

    views: SeededViews
    source: Dataset  # the raw images (its .skipped grows when a file fails to decode late)
    bank: Dataset | None
    test: Dataset | None
    num_classes: int
    skipped: list


def open_images(data: Data, path: str | None = None) -> Dataset:
    """The raw dataset of ``data`` (uint8 [3,H,W], label) — a folder or the built-in shapes."""
    if data.dataset == "shapes" and path is None:
        return ShapesDataset(data.shapes_size, image_size=data.shapes_image_size, seed=data.seed,
                             colour=data.shapes_colour)
    path = path or data.path
    if not path:
        raise DataError("data.path: required when data.dataset=folder (or use data.dataset=shapes)")
    return ImageFolderDataset(
        path, bad_files=data.bad_files, verify=data.verify, limit=data.limit, seed=data.seed,
        max_pixels=data.max_pixels,
    )


def labels_of(ds: Dataset) -> list[int] | None:
    labels = getattr(ds, "labels", None)
    return list(labels) if labels is not None else None


def eval_crop_fraction(size: int) -> float:
    """Centre crop 224/256 for large images (PAPER.md §5); none for small ones like CIFAR."""
    return 0.875 if size > 64 else 1.0


def make_eval_transform(aug: Augment) -> Callable:
    return eval_transform(aug.size, crop_fraction=eval_crop_fraction(aug.size), mean=aug.mean, std=aug.std)


def view_specs(aug: Augment) -> tuple[ViewSpec, ViewSpec]:
    """The ViewSpecs of T and T' that ``aug`` describes."""
    t1, t2 = byol_view_specs(
        aug.size, crop_scale=aug.crop_scale, crop_ratio=aug.crop_ratio, flip_prob=aug.flip_prob,
        jitter_prob=aug.jitter_prob, brightness=aug.brightness, contrast=aug.contrast,
        saturation=aug.saturation, hue=aug.hue, grayscale_prob=aug.grayscale_prob,
        blur_sigma=aug.blur_sigma, mean=aug.mean, std=aug.std,
    )
    t1 = dataclasses.replace(t1, blur_prob=aug.blur_prob[0], solarize_prob=aug.solarize_prob[0])
    t2 = dataclasses.replace(t2, blur_prob=aug.blur_prob[1], solarize_prob=aug.solarize_prob[1])
    return t1, t2


def make_views(aug: Augment) -> Callable:
    """What the workers do to each image. ``reference``: all of T and T' (float views);
    ``batched``: crop + flip only (uint8 views), the rest runs on the device per batch
    (``byol.augment.batched.BatchedPhotometric``, applied by the training loop)."""
    t1, t2 = view_specs(aug)
    if aug.backend == "batched":
        return TwoViews(CropFlip(t1), CropFlip(t2))
    return two_view_transform(t1, t2)


class DeviceViews:
    """The photometric half of T and T' on the training device (augment.backend=batched):
    uint8 views [B, 3, S, S] x2 (cropped and flipped by the workers) -> float views, normalised,
    every parameter drawn per sample. The draws come from a CPU generator seeded by (seed, step,
    rank): the same on any device, and a resumed run draws what the uninterrupted one did."""

    def __init__(self, aug: Augment, seed: int) -> None:
        from byol.augment.batched import BatchedPhotometric

        t1, t2 = view_specs(aug)
        self.t1, self.t2, self.seed = BatchedPhotometric(t1), BatchedPhotometric(t2), seed

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, step: int, rank: int = 0):
        g = torch.Generator().manual_seed(sample_seed(self.seed, step, rank))
        return self.t1(v1, g), self.t2(v2, g)


def build_pretrain_data(cfg: Config) -> PretrainData:
    """Open the images, hold out ``val_fraction`` per class when labelled, wrap for training."""
    raw = open_images(cfg.data)
    labels = labels_of(raw)
    skipped = list(getattr(raw, "skipped", []))
    if labels is None or cfg.data.val_fraction == 0:
        train_idx, test_idx = list(range(len(raw))), []
    else:
        train_idx, test_idx = split_per_class(labels, cfg.data.val_fraction, cfg.data.seed)
    if len(train_idx) < cfg.optim.batch_size:
        raise DataError(
            f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(train_idx)} "
            f"training images of {cfg.data.path or cfg.data.dataset}"
        )
    train = Subset(raw, train_idx)
    views = SeededViews(train, make_views(cfg.augment), cfg.train.seed)
    bank = test = None
    num_classes = 0
    if labels is not None and test_idx:
        tf = make_eval_transform(cfg.augment)
        bank, test = Transformed(train, tf), Transformed(Subset(raw, test_idx), tf)
        num_classes = max(labels) + 1
    return PretrainData(views, raw, bank, test, num_classes, skipped)


def default_workers(requested: int | None, device: torch.device | None = None) -> int:
    """Loader processes: the request, else min(8, cores) on CUDA; on the CPU the workers take
    cores from the step itself, so none on a machine of <= 2 cores (measured: 0 workers gave
    the most images/s for the demo on 2 cores; see docs/benchmarks.md)."""
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    if device is not None and device.type == "cuda":
        return min(8, cores)
    return 0 if cores <= 2 else min(4, cores // 2)


def loader(ds: Dataset, batch_size: int, *, workers: int, sampler=None, drop_last=False,
           pin_memory=False, generator: torch.Generator | None = None, persistent=False) -> DataLoader:
    """A DataLoader; ``persistent`` keeps its worker processes alive between iterations."""
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
        generator=generator,
    )
