"""Projector g and predictor q (docs/method.md §2): Linear -> norm -> ReLU -> Linear.

[B, in_dim] -> [B, out_dim]. The paper's heads are 2048 -> 4096 -> 256 (projector) and
256 -> 4096 -> 256 (predictor), batch norm in the hidden layer and none on the output.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_NORMS = ("bn", "ln", "none")


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    if kind == "ln":
        return nn.LayerNorm(dim)
    return nn.Identity()


class MLPHead(nn.Module):
    """Two-layer MLP head. ``norm`` is "bn" (paper), "ln" or "none" (docs/method.md §8 ablations).

    The first Linear keeps its bias and the output Linear has none, as in docs/method.md §2: with
    normalisation after the first layer its bias is redundant but harmless; the output feeds a
    cosine, so a bias there only adds a constant direction.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, norm: str = "bn"):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if value <= 0:
                raise ValueError(f"MLPHead: {name} must be > 0, got {value}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"MLPHead: norm must be one of {HEAD_NORMS}, got {norm!r}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            _norm(norm, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
