"""Optimisers and schedules of docs/method.md §4: LARS, its parameter groups, and ``build_optimizer``."""
from __future__ import annotations

import torch
from torch import nn

from byol.optim.lars import LARS, NORM_LAYERS, excluded_from_decay_and_adaptation, param_groups
from byol.optim.schedules import constant_tau, cosine_tau, scaled_lr, warmup_cosine_lr

OPTIMIZERS = ("lars", "sgd", "adamw")

__all__ = [
    "LARS", "NORM_LAYERS", "OPTIMIZERS", "build_optimizer", "constant_tau", "cosine_tau",
    "excluded_from_decay_and_adaptation", "param_groups", "scaled_lr", "warmup_cosine_lr",
]


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    trust_coefficient: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    predictor_lr_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` ("lars" as in docs/method.md §4, or "sgd"/"adamw" as baselines).

    All three use ``param_groups``, so biases and norm parameters get no weight decay whichever
    optimizer is chosen; only LARS reads the ``lars_adapt`` key, the others do not get it.
    ``lr`` is the starting value; the training loop overwrites each group's lr from the schedule
    (times the group's ``lr_scale``: ``predictor_lr_scale`` for the predictor's parameters).
    """
    groups = param_groups(model, weight_decay, {"predictor.": predictor_lr_scale})
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    trust_coefficient=trust_coefficient)
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name: unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    plain = [{k: v for k, v in g.items() if k != "lars_adapt"} for g in groups]  # lr_scale stays: set_lr reads it
    if name == "sgd":
        return torch.optim.SGD(plain, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    return torch.optim.AdamW(plain, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
