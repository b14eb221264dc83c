"""Loader processes: how many to start (``default_workers``) and the DataLoader they feed."""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset


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
