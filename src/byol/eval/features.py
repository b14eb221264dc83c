"""Frozen-feature extraction: encoder in eval mode (BN uses its running statistics)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dataset of (image [3,H,W], label) -> (features [N, D] float32 on CPU, labels [N])."""
    was_training = encoder.training
    encoder.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    feats, labels = [], []
    try:
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            # NHWC: the encoder may be in channels_last (train.channels_last); a no-op cost if not
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            feats.append(encoder(x).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)
