"""BYOL's regression loss (PAPER.md §1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z). [B, D], [B, D] -> [B].

    Computed in float32 whatever the autocast dtype: the cosine of nearly aligned vectors loses
    its last digits in bf16, and those digits are the whole signal late in training.
    """
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    return 2.0 - 2.0 * (p * z).sum(dim=-1)


def symmetric_regression_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """BYOL loss: l(p1, z2') + l(p2, z1'), each averaged over the batch, then **summed**.

    Summed, not averaged, as in the paper and the official code: under LARS the bias and norm
    parameters are not scale-invariant, so halving the loss would change the training dynamics.
    Scalar in [0, 8].
    """
    return regression_loss(p1, z2).mean() + regression_loss(p2, z1).mean()
