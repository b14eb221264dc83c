"""Process-group helpers. The only module that imports torch.distributed (STYLE.md rule 8).

Every helper is a no-op at world size 1, so single-process code calls them unconditionally.
"""
from __future__ import annotations

import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on the process that writes logs and checkpoints (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()
