"""The target branch of the BYOL family: where the regression targets z' come from.

One small strategy object, chosen once when the model is built (``models/build.py`` maps
``method.target`` to it), so that neither ``forward`` nor ``update_target`` tests a mode:

    EMATarget       BYOL, MoCo: f_ξ, g_ξ, an exponential moving average of the online f, g,
                    run under no_grad (docs/method.md §1)
    StopGradTarget  SimSiam: z' is the online projection, detached (docs/method.md §7)
    OnlineTarget    z' is the online projection itself, no stop-gradient (SimCLR, docs/method.md §7)

The strategies hold no modules and no state: the target network's modules, when there is one,
are registered on the BYOL module itself under the names ``networks`` gives (``target_encoder``,
``target_projector``: the names of every checkpoint), and each method reads them from the model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


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


class OnlineTarget:
    """z' = z, the online projection: no target network, the gradient flows through both branches."""

    def networks(self, encoder: nn.Module, projector: nn.Module) -> dict[str, nn.Module]:
        """The modules this target adds to the model, by attribute name: none."""
        return {}

    def parameters(self, model) -> list[nn.Parameter]:
        """ξ: the target network's parameters, none here."""
        return []

    def project(self, model, views: list[torch.Tensor], online_z: list[torch.Tensor]) -> list[torch.Tensor]:
        """Target projections z' per view, from the views and the online projections ``online_z``."""
        return online_z

    def update(self, model, tau: float) -> None:
        """The after-step update of ξ: nothing to move here (``tau`` is ignored)."""

    def calibrate(self, model, x: torch.Tensor) -> None:
        """Run the target's own networks once on ``x`` (the BN-free init's calibration): none."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class StopGradTarget(OnlineTarget):
    """z' = stop_gradient(z): SimSiam's target, the online projection detached."""

    def project(self, model, views: list[torch.Tensor], online_z: list[torch.Tensor]) -> list[torch.Tensor]:
        return [z.detach() for z in online_z]


class EMATarget:
    """f_ξ, g_ξ: a copy of the online encoder and projector that follows them by EMA.

    ``independent``: the target starts from fresh weights (as the official code); False starts it
    as a copy of the online network (MoCo's key encoder). Its parameters never take a gradient.
    """

    def __init__(self, independent: bool = True) -> None:
        self.independent = independent

    def networks(self, encoder: nn.Module, projector: nn.Module) -> dict[str, nn.Module]:
        target_encoder, target_projector = copy.deepcopy(encoder), copy.deepcopy(projector)
        if self.independent:
            reinitialize(target_encoder)
            reinitialize(target_projector)
        for p in [*target_encoder.parameters(), *target_projector.parameters()]:
            p.requires_grad_(False)
        return {"target_encoder": target_encoder, "target_projector": target_projector}

    def parameters(self, model) -> list[nn.Parameter]:
        """ξ, the parameters of (f_ξ, g_ξ), in the order of ``model.online_parameters()``."""
        return [*model.target_encoder.parameters(), *model.target_projector.parameters()]

    def project(self, model, views: list[torch.Tensor], online_z: list[torch.Tensor]) -> list[torch.Tensor]:
        """The one place where the target's stop-gradient happens: f_ξ, g_ξ under no_grad."""
        with torch.no_grad():
            if model.concat_views:
                return list(model.target_projector(model.target_encoder(torch.cat(views))).chunk(2))
            # Each view separately: per-view BN statistics, as the official code.
            return [model.target_projector(model.target_encoder(v)) for v in views]

    def update(self, model, tau: float) -> None:
        """ξ <- τ ξ + (1 - τ) θ (docs/method.md §1), one fused foreach op over all parameters.
        Only parameters are averaged: BN running statistics of the target are its own."""
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"update_target: tau must be in [0, 1], got {tau}")
        torch._foreach_lerp_(self.parameters(model), model.online_parameters(), 1.0 - tau)

    def calibrate(self, model, x: torch.Tensor) -> None:
        model.target_projector(model.target_encoder(x))

    def __repr__(self) -> str:
        return f"EMATarget(independent={self.independent})"
