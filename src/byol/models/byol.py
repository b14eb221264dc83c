"""The BYOL module (docs/method.md §1): online network (f, g, q) and a target, from parts.

    model = BYOL(backbone, feature_dim=2048)  # BYOL: MLP heads, EMA target, regression loss
    out = model(view1, view2)                 # ForwardOutput: loss, stats, y and z of view 1
    out.loss.backward(); opt.step(); model.update_target(tau); model.update_queue()

The members of the family (docs/method.md §7) differ only in the parts ``models/build.py``
assembles from the config: the predictor q (or none), the target strategy (``models/targets.py``:
EMA, online with stop-gradient, online), the loss (``losses.RegressionLoss``/``InfoNCELoss``) and
an optional MoCo queue (``models/queue.py``). Each is chosen once, here; ``forward`` and the
updates test no mode. The EMA and the queue append are explicit calls after the optimizer step,
never side effects of ``forward`` on the parameters or buffers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from byol.losses import InfoNCELoss, RegressionLoss
from byol.models.heads import MLPHead
from byol.models.queue import NegativeQueue
from byol.models.targets import EMATarget, OnlineTarget


@dataclass
class ForwardOutput:
    """What one forward pass gives: the loss (with its graph) and detached tensors for the logs
    and monitors, computed anyway by the forward (no extra cost)."""

    loss: torch.Tensor  # scalar: l(q(g(f(v1))), z2') + l(q(g(f(v2))), z1'), batch-averaged
    stats: dict[str, torch.Tensor]  # detached scalars: "loss", "z_std" (normalized_std of z1)
    representation: torch.Tensor  # y1 = f(v1) [B, D], detached
    projection: torch.Tensor  # z1 = g(y1) [B, d], detached

    def detach(self) -> ForwardOutput:
        """The same outputs with the loss detached too (its graph spent by the backward)."""
        return dataclasses.replace(self, loss=self.loss.detach())


class BYOL(nn.Module):
    """Online f_θ, g_θ, q_θ around a user ``encoder`` [B,3,H,W] -> [B,D], and a target.

    Args:
        encoder: the online encoder f; ``feature_dim`` is D, the size of its output y.
        projector: g, [B, D] -> [B, d]; default ``MLPHead(feature_dim)`` (D -> 4096 -> 256, BN).
        predictor: q, [B, d] -> [B, d]; default ``MLPHead(d, 4096, d)`` with d the projector's
            ``out_dim``. ``nn.Identity()`` drops q (an ablation of docs/method.md §7).
        target: the target strategy (``models/targets.py``); default ``EMATarget()`` (BYOL,
            fresh target weights). Its networks are built here from the online f and g.
        loss: ``RegressionLoss()`` (2 - 2cos, the default) or ``InfoNCELoss(alpha, beta, gather)``.
        queue: a ``NegativeQueue`` of past target projections, the InfoNCE negatives instead of
            the batch (MoCo); needs a loss with negatives. The queue starts empty: its first step
            has no negatives, so its loss is exactly 2 per direction (no gradient from the log).
        concat_views: run both views as one batch (mixes their BN statistics; off by default,
            docs/method.md §1).

    State-dict names: ``encoder.*``, ``projector.*``, ``predictor.*``, the target's networks
    (``target_encoder.*``, ``target_projector.*`` for the EMA target) and ``queue.*``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        *,
        projector: nn.Module | None = None,
        predictor: nn.Module | None = None,
        target: EMATarget | OnlineTarget | None = None,
        loss: RegressionLoss | InfoNCELoss | None = None,
        queue: NegativeQueue | None = None,
        concat_views: bool = False,
    ) -> None:
        super().__init__()
        self.loss = loss if loss is not None else RegressionLoss()
        if queue is not None and not self.loss.has_negatives:
            raise ValueError("a queue of negatives (method.queue_size > 0) needs a loss with negatives "
                             "(method.loss=infonce with method.beta > 0)")
        self.queue = queue  # registered first: the order of the state dict's keys, as ever
        self.encoder = encoder
        self.projector = projector if projector is not None else MLPHead(feature_dim)
        self.predictor = predictor if predictor is not None else MLPHead(self.projector.out_dim)
        self.target = target if target is not None else EMATarget()
        for name, module in self.target.networks(self.encoder, self.projector).items():
            self.add_module(name, module)
        self.concat_views = concat_views
        self.feature_dim = feature_dim

    def extra_repr(self) -> str:
        return f"target={self.target!r}, loss={self.loss!r}, concat_views={self.concat_views}"

    # -- parameters ---------------------------------------------------------------------------
    def online_parameters(self) -> list[nn.Parameter]:
        """θ restricted to (f, g): the parameters the target averages, in matching order."""
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        """ξ: parameters of the target network (f_ξ, g_ξ); empty without one."""
        return self.target.parameters(self)

    # -- the updates after the optimizer step ---------------------------------------------------
    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """ξ <- τ ξ + (1 - τ) θ (docs/method.md §1) for the EMA target; a no-op for the others.

        Only parameters are averaged: BN running statistics of the target are its own.
        """
        self.target.update(self, tau)

    @torch.no_grad()
    def update_queue(self) -> None:
        """MoCo: append the last forward's target projections to the queue, after the step, so
        they become negatives of the next steps. A no-op without a queue. Under DDP every rank
        calls it in the same order (it all-gathers the keys)."""
        if self.queue is not None:
            self.queue.commit()

    def staged_keys(self) -> tuple[torch.Tensor, ...]:
        """MoCo: the target projections [n, d] (one per view) the last forward staged for
        ``update_queue``; () without a queue. Gradient accumulation (train/step.py) joins the
        micro-batches' keys and stages them again (``queue.stage``), so a step appends them once."""
        return self.queue._staged if self.queue is not None else ()

    # -- forward ------------------------------------------------------------------------------
    def _online(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
        """Online representations y, projections z and predictions p, one per view ([B, *] each)."""
        if self.concat_views:
            y = self.encoder(torch.cat(views))
            z = self.projector(y)
            p = self.predictor(z)
            n = len(views)
            return list(y.chunk(n)), list(z.chunk(n)), list(p.chunk(n))
        ys = [self.encoder(v) for v in views]
        zs = [self.projector(y) for y in ys]
        return ys, zs, [self.predictor(z) for z in zs]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> ForwardOutput:
        """Views [B, 3, H, W] x2 -> ForwardOutput.

        loss = l(q(g(f(v1))), z2') + l(q(g(f(v2))), z1'), batch-averaged, z' from the target.
        With a queue, the loss reads the keys of earlier steps and this step's z' are staged
        for ``update_queue``.
        """
        (y1, _), (z1, z2), (p1, p2) = self._online([v1, v2])
        t1, t2 = self.target.project(self, [v1, v2], [z1, z2])
        if self.queue is None:
            loss = self.loss(p1, p2, t1, t2)
        else:
            loss = self.loss(p1, p2, t1, t2, queue=self.queue.keys, queue_valid=self.queue.valid())
            self.queue.stage(t1, t2)
        stats = {"loss": loss.detach(), "z_std": normalized_std(z1.detach())}
        return ForwardOutput(loss, stats, y1.detach(), z1.detach())

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Run every network once on ``x`` [B, 3, H, W] (online f, g, q; the target's own): the
        calibration pass of the BN-free init (``models/build.py``, docs/method.md §8)."""
        self.predictor(self.projector(self.encoder(x)))
        self.target.calibrate(self, x)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Representation y = f_θ(x) [B, D] of the online encoder, the one kept after training."""
        return self.encoder(x)


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (docs/method.md §8): mean per-dimension std of L2-normalised z, times sqrt(d).

    About 1 for well-spread projections, 0 at collapse. [B, d] -> scalar.
    """
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5
