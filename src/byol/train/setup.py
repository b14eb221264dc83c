"""What a run builds before its first step: the model (with the BN-free init when configured)
and its optimizer."""
from __future__ import annotations

import torch

from byol.config import Config
from byol.data.pipeline import memory_format_of
from byol.models.build import bn_free_init, build_model
from byol.optim import build_optimizer
from byol.train.calibrate import calibration_batch


def build_model_and_optimizer(cfg: Config, device: torch.device, data=None):
    """The BYOL model on ``device`` in the configured memory format, and its optimizer (lr set
    per step by the schedule). Draws the initial weights from the global RNG. With ``data`` and
    ``model.bn_free_init``: the data-dependent init, on a batch of it."""
    memory_format = memory_format_of(cfg)
    calibrate = data is not None and cfg.model.bn_free_init
    model = build_model(cfg, keep_bn=calibrate).to(device, memory_format=memory_format)
    if calibrate:
        bn_free_init(model, calibration_batch(cfg, data, device, memory_format), cfg.model.bn_free_heads)
    optimizer = build_optimizer(
        cfg.optim.name, model, lr=0.0, weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient,
    )
    return model, optimizer
