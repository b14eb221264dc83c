"""What a run builds before its first step: the model (with the BN-free init when configured)
and its optimizer."""
from __future__ import annotations

import torch

from byol.config import Config, ConfigError
from byol.data.pipeline import memory_format_of
from byol.models.build import bn_free_init, build_model, init_encoders
from byol.models.named import is_convolutional, is_named
from byol.optim import build_optimizer
from byol.train.calibrate import calibration_batch


def build_model_and_optimizer(cfg: Config, device: torch.device, data=None, *, init: bool = True):
    """The BYOL model on ``device`` in the configured memory format (contiguous for vision
    transformers), with ``model.init`` loaded into its encoders, and its optimizer (lr set per
    step by the schedule). Draws the initial weights from the global RNG. With ``data`` and
    ``model.bn_free_init``: the data-dependent init, on a batch of it. ``init=False`` (a resume,
    whose checkpoint holds the weights) does not read ``model.init``."""
    # NHWC helps convolutions only: a vision transformer's weights stay contiguous
    memory_format = memory_format_of(cfg) if is_convolutional(cfg.model.backbone) else torch.contiguous_format
    calibrate = data is not None and cfg.model.bn_free_init
    model = build_model(cfg, keep_bn=calibrate)
    if init:
        model = init_encoders(model, cfg)  # model.init: online and target
    model = model.to(device, memory_format=memory_format)
    check_eval_size(model.encoder, cfg, device)
    if calibrate:
        bn_free_init(model, calibration_batch(cfg, data, device, memory_format), cfg.model.bn_free_heads)
    optimizer = build_optimizer(
        cfg.optim.name, model, lr=0.0, weight_decay=cfg.optim.weight_decay,
        momentum=cfg.optim.momentum, trust_coefficient=cfg.optim.trust_coefficient,
        predictor_lr_scale=cfg.optim.predictor_lr_scale,
    )
    return model, optimizer


def check_eval_size(encoder: torch.nn.Module, cfg: Config, device: torch.device) -> None:
    """A named backbone evaluated at another size than it trains at (``augment.eval_size``): one
    forward of blank images at that size now, so that a model that takes one image size fails
    before training, in one line, not at its first evaluation. Eval mode, no gradient: no weight,
    statistic or random number changes."""
    aug, backbone = cfg.augment, cfg.model.backbone
    if not is_named(backbone) or aug.eval_px == aug.size:
        return
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(2, 3, aug.eval_px, aug.eval_px, device=device))
    except Exception as e:  # the model's own complaint, first line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config: augment.eval_size={aug.eval_px}: {backbone} does not take "
                          f"{aug.eval_px}-px images ({reason}); set it to augment.size={aug.size}") from None
    finally:
        encoder.train(was_training)
