"""The resumable sampler: a seeded permutation per epoch, started at any position.

The sampler yields ``(epoch, index)`` keys, so the dataset (``byol.data.seeded.SeededSamples``)
can seed each image's augmentation from them: a resumed run sees the order and the views of
the uninterrupted one without saving any RNG state.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler):
    """Seeded permutation per epoch, started at any position; yields (epoch, index) pairs.

    ``set_epoch(epoch, start)`` makes the next iteration yield the permutation of ``epoch`` from
    its ``start``-th element on: the sampler position a resume restores. Under DDP
    (``world_size`` > 1) every rank walks the same permutation in global batches of
    ``batch_size`` and takes its slice of each one, so one step of W ranks sees exactly the
    global batch a single process would (``start`` is then a multiple of ``batch_size``).
    ``order(epoch)`` (given) replaces the permutation: a list of ``range(n)`` that depends on
    (seed, epoch) only, e.g. the shard order of tar shards (``byol.data.shards.shard_order``).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, *, rank: int = 0,
                 world_size: int = 1, batch_size: int | None = None,
                 order: Callable[[int], list[int]] | None = None) -> None:
        if world_size > 1 and (batch_size is None or batch_size % world_size):
            raise ValueError(f"optim.batch_size={batch_size} must be a multiple of the "
                             f"{world_size} processes")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.order = order
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        if self.order is not None:
            return self.order(epoch)
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
