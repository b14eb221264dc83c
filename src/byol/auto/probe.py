"""Probes on the training device for the ``auto`` rules: the largest batch that fits in its memory,
and the step rate at the chosen batch.

Both step a throwaway copy of the run's model and optimizer (lr 0) on random views of the run's
image size, inside a forked random state, so the run's own initial weights are what they would be
without the probe. The rate counts the step only (no loading, no augmentation): the budget meter
(train/budget.py) measures the real rate later; this one only sizes tau and the warm-up.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from byol.train.step import train_step

HEADROOM = 0.8  # a probed batch must peak below this fraction of the memory free at the start
START_BATCH = 32


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int) -> int | None:
    """Double the batch from ``start`` while ``fits(batch)`` and it stays within ``cap``: the
    largest batch that fitted, or None when ``start`` did not."""
    best, batch = None, start
    while batch <= cap and fits(batch):
        best, batch = batch, batch * 2
    return best


class StepProbe:
    """The run's model and optimizer, built once for probing (``cfg`` fully chosen but tau and
    warm-up); ``step(batch)`` runs one training step on random views."""

    def __init__(self, cfg, device: torch.device, precision: str, processes: int = 1) -> None:
        from byol.train.setup import build_model_and_optimizer

        self.cfg, self.device, self.precision, self.processes = cfg, device, precision, processes
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            self.model, self.optimizer = build_model_and_optimizer(cfg, device, init=False)

    def step(self, batch: int) -> None:
        per_rank = max(2, batch // self.processes)
        size = self.cfg.augment.size
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            v1 = torch.rand(per_rank, 3, size, size, device=self.device)
            v2 = torch.rand_like(v1)
            train_step(self.model, self.optimizer, v1, v2, lr=0.0, tau=0.99, precision=self.precision)
        self.optimizer.zero_grad(set_to_none=True)

    def fits(self, batch: int) -> bool:
        """CUDA: whether a step at ``batch`` peaks below HEADROOM of the free memory."""
        free, _ = torch.cuda.mem_get_info(self.device)
        limit = HEADROOM * (free + torch.cuda.memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.step(batch)
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) <= limit
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    def rate(self, batch: int, steps: int = 5, warmup: int = 3) -> float:
        """Steps per second at ``batch`` over ``steps`` timed steps after ``warmup`` untimed ones
        (the first steps of a process choose kernels and grow the allocator: several times slower)."""
        for _ in range(warmup):
            self.step(batch)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda *a: None)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(batch)
        sync(self.device)
        return steps / max(time.perf_counter() - t0, 1e-9)
