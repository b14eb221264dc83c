"""MoCo's FIFO queue of negatives (MoCo v2, He et al. / Chen et al. 2020; docs/method.md §7 negatives).

A ring buffer of the last K target projections, L2-normalised and without gradient. Its state
(keys, write position, fill count) is made of buffers, so it is saved with the model in every
checkpoint and restored on resume; DDP leaves it alone (``broadcast_buffers=False``) and every
rank appends the keys of all ranks, so the queues stay identical.

The step's own keys never leave the model: ``BYOL.forward`` hands its target projections to
``stage`` (after the loss has read the queue), and ``BYOL.update_queue`` -> ``commit`` appends
them after the optimizer step, so a step's negatives are always the keys of earlier steps.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class NegativeQueue(nn.Module):
    """``keys`` [K, D]; ``valid()`` [K] bool marks the filled slots (no host sync anywhere).

    ``gather`` ([n, D] -> [world * n, D], e.g. ``distributed.gather``) collects every rank's keys
    before they are appended, so under DDP every rank's queue gets the global batch's keys.
    """

    def __init__(self, size: int, dim: int, *,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"NegativeQueue: size and dim must be > 0, got {size}, {dim}")
        self.size, self.dim = size, dim
        self.gather = gather
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # the next slot written
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots (<= K)
        self._staged: tuple[torch.Tensor, ...] = ()  # the last forward's keys, not yet appended

    def valid(self) -> torch.Tensor:
        return torch.arange(self.size, device=self.keys.device) < self.count

    @torch.no_grad()
    def push(self, *keys: torch.Tensor) -> None:
        """Append each of ``keys`` [n, D] in turn (normalised, detached), overwriting the oldest
        once full. With ``gather``, every rank's rows of each are collected first, so under DDP
        the queue gets the global batch's keys in the order one process would append them."""
        keys = [F.normalize(k.detach().float(), dim=-1) for k in keys]
        keys = torch.cat([self.gather(k) if self.gather is not None else k for k in keys])[-self.size:]
        n = len(keys)
        slots = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.keys[slots] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))

    def stage(self, *keys: torch.Tensor) -> None:
        """Remember this step's keys (detached) for ``commit``; a later forward replaces them."""
        self._staged = tuple(k.detach() for k in keys)

    @torch.no_grad()
    def commit(self) -> None:
        """Append the keys ``stage`` holds (``push``), once: after the step, never before its loss."""
        if not self._staged:
            raise RuntimeError("update_queue: no forward pass since the last queue update")
        keys, self._staged = self._staged, ()
        self.push(*keys)
