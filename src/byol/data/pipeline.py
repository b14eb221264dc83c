"""The training input pipeline: keys -> loader workers -> device -> the step's two views.

    batches = TrainBatches(data.views, cfg, device, workers, rank=rank, world=world)
    for v1, v2, labels in batches.epoch(epoch, step_in_epoch=k, step=s):
        ...                                         # the global step s, s + 1, ... per batch

One DataLoader serves the whole run (its workers persist across epochs): the sampler carries
the epoch in every key and the views are seeded per sample (``byol.data.seeded``), so worker
seeds never matter and a resumed run, started mid-epoch, sees the batches of the uninterrupted
one. With ``augment.backend=batched`` the workers only crop and flip (uint8 crops in torchvision
semantics, float32 in [0, 1] in official semantics, docs/fidelity.md); ``DeviceViews`` draws the
photometric rest of T and T' on the device per batch, seeded by (seed, step, rank).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from byol.config import Augment, Config
from byol.data.sampler import ResumableSampler
from byol.data.transforms import view_specs
from byol.data.workers import loader
from byol.seeding import sample_seed


def memory_format_of(cfg: Config) -> torch.memory_format:
    """The memory format of a run's images and convolutions (``train.channels_last``)."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


class DeviceViews:
    """The photometric half of T and T' on the training device (augment.backend=batched):
    views [B, 3, S, S] x2 (cropped and flipped by the workers: uint8 in torchvision semantics,
    float32 in [0, 1] in official semantics) -> float views, normalised, every parameter drawn
    per sample, in ``augment.semantics``. The draws come from a CPU generator seeded by (seed, step,
    rank): the same on any device, and a resumed run draws what the uninterrupted one did."""

    def __init__(self, aug: Augment, seed: int) -> None:
        from byol.augment.batched import BatchedPhotometric

        t1, t2 = view_specs(aug)
        self.t1, self.t2, self.seed = BatchedPhotometric(t1), BatchedPhotometric(t2), seed

    def __call__(self, v1: torch.Tensor, v2: torch.Tensor, step: int, rank: int = 0):
        g = torch.Generator().manual_seed(sample_seed(self.seed, step, rank))
        return self.t1(v1, g), self.t2(v2, g)


class TrainBatches:
    """This rank's training batches, ready for the step: (v1, v2, labels) with v1, v2 float
    [B, 3, S, S] on ``device`` in the configured memory format, labels [B] as loaded (CPU).

    ``views``: a dataset of (epoch, i) -> (view1, view2, label) (``PretrainData.views``);
    ``workers``: loader processes. B = optim.batch_size // ``world``: rank ``rank`` takes its
    slice of every global batch. Every epoch drops its last partial global batch.
    """

    def __init__(self, views: Dataset, cfg: Config, device: torch.device, workers: int,
                 rank: int = 0, world: int = 1) -> None:
        self.global_batch = cfg.optim.batch_size
        self.steps_per_epoch = len(views) // self.global_batch
        self.device, self.rank = device, rank
        self.memory_format = memory_format_of(cfg)
        self.sampler = ResumableSampler(len(views), seed=cfg.train.seed, rank=rank, world_size=world,
                                        batch_size=self.global_batch, order=getattr(views, "order", None))
        # The loader takes its worker seeds from its own generator, never the global RNG.
        self.loader = loader(views, self.global_batch // world, workers=workers, sampler=self.sampler,
                             drop_last=True, pin_memory=device.type == "cuda",
                             generator=torch.Generator().manual_seed(cfg.train.seed), persistent=True)
        self.device_views = (DeviceViews(cfg.augment, cfg.train.seed)
                             if cfg.augment.backend == "batched" else None)

    def epoch(self, epoch: int, *, step_in_epoch: int = 0, step: int = 0,
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch`` from its ``step_in_epoch``-th on; ``step`` is the global step
        of the first one, and each later batch is one step further (the device views' seed: the
        loop counts one step per batch, a skipped step too)."""
        self.sampler.set_epoch(epoch, start=step_in_epoch * self.global_batch)
        return self._batches(step)

    def _batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for k, (v1, v2, labels) in enumerate(self.loader):
            v1, v2 = (v.to(self.device, non_blocking=True) for v in (v1, v2))
            if self.device_views is not None:  # crops -> the rest of T and T', batched
                v1, v2 = self.device_views(v1, v2, step + k, self.rank)
            v1, v2 = (v.contiguous(memory_format=self.memory_format) for v in (v1, v2))
            yield v1, v2, labels
