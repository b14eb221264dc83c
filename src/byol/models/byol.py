"""The BYOL module (PAPER.md §1): online network (f, g, q), target network (f, g).

    model = BYOL(backbone, feature_dim=2048)
    loss, stats = model(view1, view2)      # symmetric 2 - 2cos, target under no_grad
    loss.backward(); opt.step(); model.update_target(tau)

The EMA update is an explicit call, never a side effect of ``forward`` (STYLE.md rule 11).
"""
from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn

from byol import distributed
from byol.losses import symmetric_infonce_loss, symmetric_regression_loss
from byol.models.heads import MLPHead
from byol.models.queue import NegativeQueue

TARGET_MODES = ("ema", "online_stopgrad", "online")
TARGET_INITS = ("independent", "copy")
LOSSES = ("regression", "infonce")


def reinitialize(module: nn.Module) -> None:
    """Draw fresh weights for ``module`` from the global RNG.

    Uses the module's own ``reset_parameters`` when it has one (our ResNet re-runs torchvision's
    initialisation), otherwise that of every submodule that defines it.
    """
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class BYOL(nn.Module):
    """Online f_θ, g_θ, q_θ and target f_ξ, g_ξ around a user ``backbone`` [B,3,H,W] -> [B,D].

    Args:
        backbone: the online encoder f; ``feature_dim`` is D, the size of its output y.
        projector_hidden/projector_out: g is D -> hidden -> out (4096 -> 256 in the paper).
        predictor_hidden: q is out -> hidden -> out.
        head_norm: normalisation in the hidden layer of the projector ("bn", "ln", "none"), and
            of the predictor unless ``predictor_norm`` is given (PAPER.md §8).
        predictor: False drops q (an ablation of PAPER.md §7).
        target: "ema" (BYOL), "online_stopgrad" (SimSiam: z' is the online projection,
            detached) or "online" (no stop-gradient).
        target_init: "independent" (fresh weights, as the official code) or "copy" of online.
        concat_views: run both views as one batch (mixes their BN statistics; off by default,
            PAPER.md §1).
        loss: "regression" (2 - 2cos, BYOL) or "infonce", the generalized objective of PAPER.md
            §7 with temperature ``alpha`` and negative weight ``beta`` (negatives from the batch,
            both views; beta = 0 is the regression loss).
        queue_size: > 0 takes the InfoNCE negatives from a FIFO queue of that many past target
            projections (MoCo) instead of the batch; ``update_queue`` appends, after the step.
        gather: [b, D] -> ([world * b, D], offset), differentiable (``distributed.gather_with_grad``)
            to draw batch negatives from every rank under DDP; then the queue appends every rank's
            keys too (``distributed.gather``). The queue starts empty: its first step has no
            negatives, so its loss is exactly 2 (no gradient), as with one positive and nothing else.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projector_hidden: int = 4096,
        projector_out: int = 256,
        predictor_hidden: int = 4096,
        head_norm: str = "bn",
        predictor_norm: str | None = None,
        predictor: bool = True,
        target: str = "ema",
        target_init: str = "independent",
        concat_views: bool = False,
        loss: str = "regression",
        alpha: float = 0.1,
        beta: float = 0.0,
        queue_size: int = 0,
        gather=None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"method.loss must be one of {LOSSES}, got {loss!r}")
        # chosen once: no string test in the hot path (DESIGN.md "Method variants")
        self.loss_fn = (partial(symmetric_infonce_loss, alpha=alpha, beta=beta, gather=gather)
                        if loss == "infonce" else symmetric_regression_loss)
        if queue_size and not (loss == "infonce" and beta > 0):
            raise ValueError("method.queue_size > 0 needs method.loss=infonce with method.beta > 0 "
                             "(the queue holds the negatives)")
        self.queue = NegativeQueue(queue_size, projector_out) if queue_size else None
        self._gather_keys = distributed.gather if gather is not None else None
        if target not in TARGET_MODES:
            raise ValueError(f"method.target must be one of {TARGET_MODES}, got {target!r}")
        if target_init not in TARGET_INITS:
            raise ValueError(f"model.target_init must be one of {TARGET_INITS}, got {target_init!r}")
        self.encoder = backbone
        self.projector = MLPHead(feature_dim, projector_hidden, projector_out, head_norm)
        self.predictor = (
            MLPHead(projector_out, predictor_hidden, projector_out, predictor_norm or head_norm)
            if predictor
            else nn.Identity()
        )
        self.target_mode = target
        self.concat_views = concat_views
        self.feature_dim = feature_dim
        if target == "ema":
            self.target_encoder = copy.deepcopy(self.encoder)
            self.target_projector = copy.deepcopy(self.projector)
            if target_init == "independent":
                reinitialize(self.target_encoder)
                reinitialize(self.target_projector)
            for p in self.target_parameters():
                p.requires_grad_(False)

    # -- parameters ---------------------------------------------------------------------------
    def online_parameters(self) -> list[nn.Parameter]:
        """θ restricted to (f, g): the parameters the target averages, in matching order."""
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def target_parameters(self) -> list[nn.Parameter]:
        """ξ: parameters of (f_ξ, g_ξ); empty unless target == "ema"."""
        if self.target_mode != "ema":
            return []
        return [*self.target_encoder.parameters(), *self.target_projector.parameters()]

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """ξ <- τ ξ + (1 - τ) θ (PAPER.md §1), one fused foreach op over all parameters.

        Only parameters are averaged: BN running statistics of the target are its own.
        Call after the optimizer step. A no-op unless target == "ema".
        """
        if self.target_mode != "ema":
            return
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"update_target: tau must be in [0, 1], got {tau}")
        torch._foreach_lerp_(self.target_parameters(), self.online_parameters(), 1.0 - tau)

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

    def _target(self, views: list[torch.Tensor], online_z: list[torch.Tensor]) -> list[torch.Tensor]:
        """Target projections z' per view. The one place where stop-gradient happens."""
        if self.target_mode == "online":
            return online_z
        if self.target_mode == "online_stopgrad":
            return [z.detach() for z in online_z]
        with torch.no_grad():
            if self.concat_views:
                return list(self.target_projector(self.target_encoder(torch.cat(views))).chunk(2))
            # Each view separately: per-view BN statistics, as the official code.
            return [self.target_projector(self.target_encoder(v)) for v in views]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, *, return_outputs: bool = False):
        """Views [B, 3, H, W] x2 -> (loss scalar, stats of detached tensors).

        loss = l(q(g(f(v1))), g_ξ(f_ξ(v2))) + l(q(g(f(v2))), g_ξ(f_ξ(v1))), batch-averaged.
        With ``return_outputs`` also a third item, {"representation": y1 [B, D], "projection":
        z1 [B, d]} of the first view, detached: what the monitors read, at no extra forward cost.
        """
        (y1, _), (z1, z2), (p1, p2) = self._online([v1, v2])
        t1, t2 = self._target([v1, v2], [z1, z2])
        if self.queue is None:
            loss = self.loss_fn(p1, p2, t1, t2)
        else:
            loss = self.loss_fn(p1, p2, t1, t2, queue=self.queue.keys, queue_valid=self.queue.valid())
        stats = {"loss": loss.detach(), "z_std": normalized_std(z1.detach())}
        if return_outputs:
            out = {"representation": y1.detach(), "projection": z1.detach()}
            if self.queue is not None:
                out["keys"] = (t1.detach(), t2.detach())  # for update_queue, after the step
            return loss, stats, out
        return loss, stats

    @torch.no_grad()
    def update_queue(self, outputs: dict) -> None:
        """Append this step's target projections (``forward(..., return_outputs=True)["keys"]``)
        to the MoCo queue: an explicit call, like ``update_target``. A no-op without a queue."""
        if self.queue is not None:
            self.queue.push(*outputs["keys"], gather=self._gather_keys)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Representation y = f_θ(x) [B, D] of the online encoder, the one kept after training."""
        return self.encoder(x)


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (PAPER.md §8): mean per-dimension std of L2-normalised z, times sqrt(d).

    About 1 for well-spread projections, 0 at collapse. [B, d] -> scalar.
    """
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5
