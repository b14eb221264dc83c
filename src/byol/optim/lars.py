"""LARS (Layer-wise Adaptive Rate Scaling) as BYOL uses it (docs/method.md §4).

Per parameter w with gradient g, weight decay wd, trust coefficient eta, momentum mu, lr:

    g <- g + wd * w                                   (decay is added to the gradient first)
    g <- g * eta * ||w|| / ||g||   if lars_adapt      (by 1 when either norm is 0)
    m <- mu * m + g                                   (trace with m_0 = 0, so m_1 = g_1)
    w <- w - lr * m

Biases, normalisation parameters, other 1-D parameters and transformer tokens get neither the
decay nor the trust ratio (the official code's ``exclude_bias_from_adaption``, timm's rule);
``excluded_from_decay_and_adaptation`` is the one place that decides which parameters those are,
and ``param_groups`` turns that into optimizer groups.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from byol.models.norms import Affine

# _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants and InstanceNorm1d/2d/3d.
# LocalResponseNorm is a normalisation layer too but has no parameters, so it needs no entry.
# RMSNorm exists from torch 2.4 on; the project supports older versions. Affine is what the
# BN-free init leaves in place of each BN layer (models/norms.py): BN's scale and offset.
NORM_LAYERS: tuple[type[nn.Module], ...] = tuple(
    t for t in (_NormBase, nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None), Affine) if t is not None
)


# Token and position parameters of vision transformers: multi-dimensional, yet neither decayed nor
# adapted (timm's ``no_weight_decay()`` convention; torchvision's ViT and Swin names too).
TOKEN_PARAMS = frozenset({"pos_embed", "pos_embedding", "cls_token", "class_token", "dist_token", "reg_token",
                          "absolute_pos_embed", "relative_position_bias_table", "pos_embed_window"})


def _no_weight_decay_of(module: nn.Module) -> set[str]:
    """The names a timm model declares through ``no_weight_decay()`` (relative to it), or none."""
    nwd = getattr(module, "no_weight_decay", None)
    if not callable(nwd):
        return set()
    try:
        return {str(n) for n in nwd()}
    except Exception:  # a module's own method with another meaning: ignore it
        return set()


def excluded_from_decay_and_adaptation(model: nn.Module) -> set[str]:
    """Names of the parameters that LARS leaves alone (docs/method.md §4).

    Excluded: every parameter of a normalisation layer (``NORM_LAYERS``: BatchNorm and
    SyncBatchNorm, LayerNorm, GroupNorm, RMSNorm, our Affine, and their subclasses such as timm's
    BatchNormAct2d, LayerNorm2d, GroupNormAct), every bias (a parameter whose own name is
    ``"bias"``), every other parameter with at most one dimension (per-channel scales such as
    timm's layer-scale gamma or RmsNorm weight), and the tokens and position embeddings of
    vision transformers (``TOKEN_PARAMS`` and what a timm model's ``no_weight_decay()`` names):
    neither weight decay nor the LARS trust ratio, as in the official code for biases and BN.
    Why: these tensors are small, one value per channel, and the network is not invariant to
    their scale the way it is (through the following normalisation) to a conv weight's. Decaying
    them pulls the norm scale towards 0 and shrinks activations for no benefit, and the trust
    ratio eta * ||w|| / ||g|| of a zero-initialised bias (or token) is tiny or undefined, which
    would freeze them. Conv and Linear weights (>= 2-D) are decayed and adapted in every family.

    Returns qualified names exactly as ``model.named_parameters()`` yields them (so a parameter
    shared between modules appears once, under its first name).
    """
    excluded_ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for own_name, param in module.named_parameters(recurse=False):
            if is_norm or own_name == "bias" or param.dim() <= 1 or own_name in TOKEN_PARAMS:
                excluded_ids.add(id(param))
        declared = _no_weight_decay_of(module)
        if declared:
            for name, param in module.named_parameters():
                if name in declared or name.rpartition(".")[2] in declared:
                    excluded_ids.add(id(param))
    # Map back through named_parameters() so the names match what callers iterate over.
    return {name for name, p in model.named_parameters() if id(p) in excluded_ids}


def param_groups(model: nn.Module, weight_decay: float, scaled: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Two optimizer groups (docs/method.md §4): decayed + adapted, and the excluded ones.

    ``[{"params": regular, "weight_decay": weight_decay, "lars_adapt": True},
    {"params": excluded, "weight_decay": 0.0, "lars_adapt": False}]``; frozen parameters
    (``requires_grad=False``) are skipped and an empty group is left out.
    ``scaled`` maps a submodule's name prefix (``"predictor."``) to an lr multiple other than 1:
    its parameters get groups of their own with that ``lr_scale`` (``train.step.set_lr`` reads it).
    """
    excluded = excluded_from_decay_and_adaptation(model)
    scales = {prefix: scale for prefix, scale in (scaled or {}).items() if scale != 1.0}
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
            buckets.setdefault((scale, name in excluded), []).append(param)
    groups = []
    for scale in dict.fromkeys([1.0, *scales.values()]):
        for exempt in (False, True):
            params = buckets.get((scale, exempt), [])
            if params:
                group = {"params": params, "weight_decay": 0.0 if exempt else weight_decay, "lars_adapt": not exempt}
                if scale != 1.0:
                    group["lr_scale"] = scale
                groups.append(group)
    return groups


def _validate(lr: float, momentum: float, weight_decay: float, trust_coefficient: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"LARS: lr must be >= 0, got {lr}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"LARS: momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0.0:
        raise ValueError(f"LARS: weight_decay must be >= 0, got {weight_decay}")
    if not trust_coefficient > 0.0:
        raise ValueError(f"LARS: trust_coefficient must be > 0, got {trust_coefficient}")


class LARS(torch.optim.Optimizer):
    """LARS with momentum, the optimizer of docs/method.md §4 (see the module docstring for the step).

    Group keys: ``lr``, ``momentum``, ``weight_decay``, ``trust_coefficient`` and ``lars_adapt``
    (default True; ``param_groups`` sets it False for biases and norm parameters). State per
    parameter: ``"momentum_buffer"``, created as zeros at the first step (optax ``trace``), so
    after one step it equals the first (decayed, scaled) gradient.

    The update runs as ``torch._foreach_*`` ops over the tensors of a group that share a device
    and dtype; the trust ratios are tensor ops (``torch.where`` for the zero-norm case), so a
    step never waits on the device. ``p.grad`` is not modified.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 1e-3,
    ):
        _validate(lr, momentum, weight_decay, trust_coefficient)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_adapt=True)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its own values (overriding the defaults) are validated too."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate(group["lr"], group["momentum"], group["weight_decay"], group["trust_coefficient"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One LARS update of every parameter that has a gradient (docs/method.md §4)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device and one dtype per list.
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._update(params, group)
        return loss

    def _update(self, params: list[torch.Tensor], group: dict[str, Any]) -> None:
        grads = [p.grad for p in params]
        wd = group["weight_decay"]
        # Out of place: the caller's p.grad stays the raw gradient (clipping, logging, tests).
        updates = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else [g.clone() for g in grads]

        if group["lars_adapt"]:
            # Norms in at least float32 (bf16 ones lose digits); a bucket shares one dtype.
            norm_dtype = torch.promote_types(params[0].dtype, torch.float32)
            w_norms = torch._foreach_norm(params, 2, dtype=norm_dtype)
            u_norms = torch._foreach_norm(updates, 2, dtype=norm_dtype)
            eta = group["trust_coefficient"]
            ratios = [
                torch.where((wn > 0) & (un > 0), eta * wn / un, torch.ones_like(wn)).to(u.dtype)
                for wn, un, u in zip(w_norms, u_norms, updates)
            ]
            torch._foreach_mul_(updates, ratios)

        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                # Zero-initialised trace (optax.trace): m_1 = momentum * 0 + g_1 = g_1.
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, updates)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])
