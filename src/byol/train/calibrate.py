"""The calibration batch of the BN-free data-dependent init (docs/method.md §8, ``model.bn_free_init``):
one batch of augmented images (view T), made exactly as training makes its batches."""
from __future__ import annotations

import torch

from byol import distributed
from byol.config import Config
from byol.data.pipeline import DeviceViews


def calibration_batch(cfg: Config, data, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """View 1 of a seeded random batch (this rank's share of the global batch), on ``device``.
    Under DDP every rank calibrates its own network, then DDP's construction broadcasts rank 0's
    parameters: rank 0's calibration is the one all ranks keep."""
    n = min(cfg.optim.batch_size // distributed.world_size(), len(data.views))
    g = torch.Generator().manual_seed(cfg.train.seed + 1009 * distributed.rank())
    items = [data.views[(0, int(i))] for i in torch.randperm(len(data.views), generator=g)[:n]]
    v1, v2 = (torch.stack([item[k] for item in items]).to(device) for k in (0, 1))
    if cfg.augment.backend == "batched":  # the workers' crops -> the photometric half of T, as in training
        v1, _ = DeviceViews(cfg.augment, cfg.train.seed)(v1, v2, 0, distributed.rank())
    return v1.contiguous(memory_format=memory_format)
