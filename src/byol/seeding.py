"""Seeded randomness that leaves the caller's random stream alone.

    with seeded(seed):        # the CPU generator forked and seeded; restored on exit
        layer = nn.Linear(d, c)
    with seeded():            # forked only: draws inside do not advance the caller's stream

Only the CPU generator (``torch.default_generator``) is forked and seeded: the CUDA generators
are neither saved nor reseeded (``torch.manual_seed`` would reseed them too), so code on the
device draws from its own seeds. ``sample_seed`` mixes a seed with two keys, e.g. (seed, epoch,
index) for the views of one image (docs/method.md §3) or (seed, step, rank) for a batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int | None = None) -> Iterator[None]:
    """Run the block on the CPU generator seeded with ``seed`` (None: as it is), then restore the
    caller's generator state, whatever the block drew or raised."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        yield


def sample_seed(seed: int, epoch: int, i: int) -> int:
    """The seed of item ``i`` in ``epoch``: a fixed mix of the three, stable across processes and
    Python versions (unlike hash())."""
    return (seed * 0x9E3779B97F4A7C15 + epoch * 0xC2B2AE3D27D4EB4F + i) % 2**63
