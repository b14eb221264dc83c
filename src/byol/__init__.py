"""byol: BYOL (Bootstrap Your Own Latent) self-supervised pretraining of image encoders.

    from byol import BYOL, resnet
    model = BYOL(resnet("resnet50"), feature_dim=2048)
    loss, stats = model(view1, view2); loss.backward(); opt.step(); model.update_target(tau)
    encoder = byol.load_encoder("encoder.safetensors")      # after `byol export RUN --out ...`
"""
from byol.config import Config, ConfigError, load_config
from byol.losses import regression_loss, symmetric_regression_loss
from byol.models import BYOL, MLPHead, resnet
from byol.optim import (
    LARS,
    build_optimizer,
    cosine_tau,
    excluded_from_decay_and_adaptation,
    param_groups,
    scaled_lr,
    warmup_cosine_lr,
)

__version__ = "0.1.0"


def pretrain(cfg, **kwargs):
    """Run BYOL pretraining for a Config; see :func:`byol.train.loop.pretrain`."""
    from byol.train.loop import pretrain as _pretrain

    return _pretrain(cfg, **kwargs)


def load_encoder(path, **kwargs):
    """Load an exported encoder (safetensors) as an nn.Module; see :func:`byol.export.load_encoder`."""
    from byol.export import load_encoder as _load_encoder

    return _load_encoder(path, **kwargs)


__all__ = [
    "BYOL", "Config", "ConfigError", "LARS", "MLPHead", "build_optimizer", "cosine_tau",
    "excluded_from_decay_and_adaptation", "load_config", "load_encoder", "param_groups", "pretrain",
    "regression_loss", "resnet", "scaled_lr", "symmetric_regression_loss", "warmup_cosine_lr",
]
