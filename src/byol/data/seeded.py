"""Per-sample seeding: the random transform of image i in epoch e drawn from its own seed.

Augmentations are seeded per sample from (seed, epoch, index): the views of image i in epoch e
are the same whatever the worker count, the order of loading or a stop and resume in the
middle of the epoch. That makes resume exact without saving worker RNG states. One wrapper
serves pretraining (``ViewPairs``: two views and the label) and the classifier protocols
(``Transformed`` with a random crop + flip), docs/method.md §3 and §5.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from byol.seeding import sample_seed, seeded


class SeededSamples(Dataset):
    """(epoch, i) -> ``base[i]`` drawn with the CPU RNG seeded by ``sample_seed(seed, epoch, i)``.

    ``base`` applies a random transform that draws from the global torch RNG (torchvision v2
    does); forking the RNG makes image i of epoch e the same in any worker, in any order,
    and leaves the caller's RNG stream untouched. Keys come from ``ResumableSampler``.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        with seeded(sample_seed(self.seed, epoch, i)):
            return self.base[i]
