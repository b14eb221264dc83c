"""Frozen-feature extraction: encoder in eval mode (BN uses its running statistics).

``iter_features`` yields the features batch by batch, so a caller can write them to disk as they
come (``byol embed``, the feature cache) instead of holding all of them; ``extract_features``
concatenates them in memory.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm


@torch.no_grad()
def iter_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Dataset of (image [3,H,W], label) -> batches (features [B, D] float32 on CPU, labels [B]),
    in dataset order from sample ``start`` on. The encoder is in eval mode while the generator
    runs and gets its mode back when it ends (exhausted, closed or abandoned on an exception)."""
    was_training = encoder.training
    encoder.eval()
    n = len(dataset)
    data = dataset if start == 0 else Subset(dataset, range(start, n))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers)
    try:
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, initial=start // batch_size,
                         total=-(-n // batch_size)):
            # NHWC: the encoder may be in channels_last (train.channels_last); a no-op cost if not
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield encoder(x).float().cpu(), torch.as_tensor(y)
    finally:
        encoder.train(was_training)


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
    """Dataset of (image [3,H,W], label) -> (features [N, D] float32 on CPU, labels [N]), in memory."""
    feats, labels = [], []
    for f, y in iter_features(encoder, dataset, batch_size=batch_size, device=device, workers=workers,
                              progress=progress, desc=desc):
        feats.append(f)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
