"""MoCo's FIFO queue of negatives (MoCo v2, He et al. / Chen et al. 2020; PAPER.md §7 negatives).

A ring buffer of the last K target projections, L2-normalised and without gradient. Its state
(keys, write position, fill count) is made of buffers, so it is saved with the model in every
checkpoint and restored on resume; DDP leaves it alone (``broadcast_buffers=False``) and every
rank appends the keys of all ranks, so the queues stay identical.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class NegativeQueue(nn.Module):
    """``keys`` [K, D]; ``valid()`` [K] bool marks the filled slots (no host sync anywhere)."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"NegativeQueue: size and dim must be > 0, got {size}, {dim}")
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # the next slot written
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots (<= K)

    def valid(self) -> torch.Tensor:
        return torch.arange(self.size, device=self.keys.device) < self.count

    @torch.no_grad()
    def push(self, *keys: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Append each of ``keys`` [n, D] in turn (normalised, detached), overwriting the oldest
        once full. ``gather`` collects every rank's rows of each first, so under DDP the queue
        gets the global batch's keys in the order one process would append them."""
        keys = [F.normalize(k.detach().float(), dim=-1) for k in keys]
        keys = torch.cat([gather(k) if gather is not None else k for k in keys])[-self.size:]
        n = len(keys)
        slots = (self.ptr + torch.arange(n, device=keys.device)) % self.size
        self.keys[slots] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))
