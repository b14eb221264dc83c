"""BYOL's regression loss (docs/method.md §1) and the generalized InfoNCE of docs/method.md §7.

The functions compute; ``RegressionLoss`` and ``InfoNCELoss`` are the method's loss component,
one of them chosen when the model is built (``models/build.py``), called by ``BYOL.forward`` as
``loss(p1, p2, z1, z2)``, with the MoCo queue's keys when the model has a queue.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _direction_infonce(v: torch.Tensor, v_target: torch.Tensor, alpha: float, beta: float, *,
                       gather: Gather | None = None, queue: torch.Tensor | None = None,
                       queue_valid: torch.Tensor | None = None) -> torch.Tensor:
    """One direction of the generalized objective, as a loss: 2 - objective (docs/method.md §7).

    objective = 2/B sum_i S(v_i, v'_i)
                - beta 2 alpha/B sum_i log(sum_{j != i} exp(S(v_i, v_j)/alpha) + sum_j exp(S(v_i, v'_j)/alpha))
    with S the cosine. v = phi(u1) [B, D] (prediction, or projection without predictor),
    v' = psi(u2) [B, D] (target projection). At beta = 0 this is mean(2 - 2 cos(v, v')) exactly.

    Negatives: by default the batch, both views (SimCLR's NT-Xent). ``gather`` ([b, D] -> (the
    [world * b, D] concatenation over ranks, this rank's offset in it), differentiable) widens
    the batch to every rank's. With ``queue`` [K, D] (MoCo; ``queue_valid`` [K] marks the filled
    slots) the negatives are the queued past target projections instead: the sum in the log is
    exp(S(v_i, v'_i)/alpha) + sum_k exp(S(v_i, queue_k)/alpha).
    """
    loss = regression_loss(v, v_target).mean()
    if beta == 0:
        return loss
    with torch.autocast(v.device.type, enabled=False):  # float32 logits under bf16 autocast too
        return loss + beta * 2.0 * alpha * _log_denominator(v, v_target, alpha, gather, queue, queue_valid)


def _log_denominator(v, v_target, alpha, gather, queue, queue_valid) -> torch.Tensor:
    """mean_i log(sum of exp(S/alpha) over the negatives and the positive of anchor i)."""
    v = F.normalize(v.float(), dim=-1)
    t = F.normalize(v_target.float(), dim=-1)
    if queue is not None:
        pos = (v * t).sum(dim=-1, keepdim=True) / alpha
        neg = (v @ F.normalize(queue.float(), dim=-1).T / alpha).masked_fill(~queue_valid, float("-inf"))
        return torch.logsumexp(torch.cat((pos, neg), dim=1), dim=1).mean()
    (v_all, offset), (t_all, _) = (gather(v), gather(t)) if gather is not None else ((v, 0), (t, 0))
    own = torch.arange(len(v), device=v.device) + offset  # each anchor's column in v_all
    same = v @ v_all.T / alpha  # S(v_i, v_j) / alpha, j = i left out below
    same[torch.arange(len(v), device=v.device), own] = float("-inf")
    cross = v @ t_all.T / alpha  # S(v_i, v'_j) / alpha, the positive at column own[i]
    return torch.logsumexp(torch.cat((same, cross), dim=1), dim=1).mean()


def symmetric_infonce_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *, alpha: float, beta: float,
    gather: Gather | None = None, queue: torch.Tensor | None = None, queue_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generalized InfoNCE of docs/method.md §7, both directions summed like the BYOL loss:
    l(p1, z2') + l(p2, z1') with l = 2 - objective (negatives: see ``_direction_infonce``).

    beta = 0 gives ``symmetric_regression_loss`` exactly (BYOL with predictor and target). With
    beta = 1, no predictor and the online projections as targets it is 4 + 4 alpha NT-Xent, where
    NT-Xent is SimCLR's loss at temperature alpha averaged over all 2B anchors (tested), i.e. the
    same gradients up to the factor 4 alpha. Computed in float32.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"method.beta must be in [0, 1], got {beta}")
    if alpha <= 0:
        raise ValueError(f"method.alpha must be > 0, got {alpha}")
    kw = dict(gather=gather, queue=queue, queue_valid=queue_valid)
    return _direction_infonce(p1, z2, alpha, beta, **kw) + _direction_infonce(p2, z1, alpha, beta, **kw)


class RegressionLoss:
    """BYOL's objective, ``symmetric_regression_loss``: no negatives (so no queue)."""

    has_negatives = False

    def __call__(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return symmetric_regression_loss(p1, p2, z1, z2)

    def __repr__(self) -> str:
        return "RegressionLoss()"


@dataclass(frozen=True)
class InfoNCELoss:
    """``symmetric_infonce_loss`` at temperature ``alpha`` and negative weight ``beta``.

    ``gather`` (``distributed.gather_with_grad`` under DDP) draws the batch negatives from every
    rank. Called with ``queue``/``queue_valid`` (the model's ``NegativeQueue``), the negatives are
    the queued keys instead (MoCo): only meaningful with negatives, i.e. beta > 0.
    """

    alpha: float = 0.1
    beta: float = 0.0
    gather: Gather | None = None

    @property
    def has_negatives(self) -> bool:
        return self.beta > 0

    def __call__(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, *,
                 queue: torch.Tensor | None = None, queue_valid: torch.Tensor | None = None) -> torch.Tensor:
        return symmetric_infonce_loss(p1, p2, z1, z2, alpha=self.alpha, beta=self.beta, gather=self.gather,
                                      queue=queue, queue_valid=queue_valid)
