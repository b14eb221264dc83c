"""Normalisation variants of the encoder and heads (docs/method.md §8, Richemond et al. 2020).

- ``gn_ws``: GroupNorm in place of BatchNorm and weight-standardised convolutions (no batch
  statistics anywhere in the encoder).
- BN-free data-dependent init (:func:`remove_batchnorm`): one forward pass with batch norm on a
  batch of augmented images records each BN layer's per-channel mean μ and std σ; every BN layer
  is then replaced by a trainable per-channel :class:`Affine` with scale γ = γ₀/σ and offset
  β = β₀ − μγ (γ₀, β₀ the BN layer's own affine: 1 and 0, and γ₀ = 0 for the last BN of each
  residual block under ``zero_init_residual``), so the network computes exactly what the BN
  network computed on that batch, and no batch statistics afterwards.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BACKBONE_NORMS = ("bn", "gn_ws", "none", "affine")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class WSConv2d(nn.Conv2d):
    """Conv2d whose weight is standardised per output channel (mean 0, std 1 over fan-in) at
    every forward (Qiao et al. 2019). Same parameters and state-dict names as nn.Conv2d."""

    eps = 1e-5

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class Affine(nn.Module):
    """Per-channel y = x * weight + bias over dim 1 of [B, C] or [B, C, H, W] (a BN layer without
    statistics). Its parameters are named like BN's, so weight decay and LARS treat them alike."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # in x's dtype: bf16 activations stay bf16
        return x * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)


def groups_for(channels: int, max_groups: int = 32) -> int:
    """The most groups <= 32 that divide ``channels`` (32, as in the GN paper, for wide layers)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """channels -> the encoder's norm module for ``kind`` (one of BACKBONE_NORMS)."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn_ws":
        return lambda c: nn.GroupNorm(groups_for(c), c)
    if kind == "affine":
        return Affine
    if kind == "none":
        return lambda c: nn.Identity()
    raise ValueError(f"model.backbone_norm must be one of {', '.join(BACKBONE_NORMS[:3])}, got {kind!r}")


def standardize_convs(module: nn.Module) -> nn.Module:
    """Turn every nn.Conv2d of ``module`` into a WSConv2d in place (parameters kept)."""
    for m in module.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = WSConv2d
    return module


def _replace(module: nn.Module, make: Callable[[nn.Module], nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, _BN):
            setattr(module, name, make(child))
        else:
            _replace(child, make)


def _affine_from(bn: nn.Module, stats: tuple[torch.Tensor, torch.Tensor] | None) -> Affine:
    out = Affine(bn.num_features).to(next(bn.buffers(), bn.weight).device)
    with torch.no_grad():
        gamma = bn.weight.detach().float() if bn.affine else torch.ones_like(out.weight)
        beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(out.bias)
        if stats is None:
            out.weight.copy_(gamma)
            out.bias.copy_(beta)
        else:
            mean, var = stats
            scale = gamma * torch.rsqrt(var + bn.eps)
            out.weight.copy_(scale)
            out.bias.copy_(beta - mean * scale)
    return out


@torch.no_grad()
def remove_batchnorm(module: nn.Module, run: Callable[[], object] | None = None, *,
                     only: tuple[str, ...] | None = None) -> nn.Module:
    """Replace every BatchNorm of ``module`` (or of its children named in ``only``, e.g. the
    encoders) by an :class:`Affine`, in place.

    With ``run`` (a callable that does one forward pass of the BN network on a calibration batch),
    the data-dependent init of the module docstring: each BN's batch mean and (biased) variance
    during that pass set the affine, so the new network reproduces the BN network's train-mode
    outputs on that batch. Without ``run``: the BN's own affine, unchanged (the structure to load a
    checkpoint into). Each BN must see one batch during ``run``.
    """
    parts = [module] if only is None else [getattr(module, n) for n in only if hasattr(module, n)]
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    if run is not None:
        def record(bn, inputs, _output):
            x = inputs[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            if bn in stats:
                raise ValueError("remove_batchnorm: a BN layer ran twice during calibration")
            stats[bn] = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))

        bns = [m for part in parts for m in part.modules() if isinstance(m, _BN)]
        hooks = [bn.register_forward_hook(record) for bn in bns]
        was_training = module.training
        try:
            module.train()
            run()
        finally:
            for h in hooks:
                h.remove()
            module.train(was_training)
        missing = [bn for bn in bns if bn not in stats]
        if missing:
            raise ValueError(f"remove_batchnorm: {len(missing)} BN layers did not run during calibration")
    for part in parts:
        _replace(part, lambda bn: _affine_from(bn, stats.get(bn)))
    return module
