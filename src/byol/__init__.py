"""byol: BYOL (Bootstrap Your Own Latent) self-supervised pretraining of image encoders.

    from byol import BYOL, resnet
    model = BYOL(resnet("resnet50"), feature_dim=2048)
    out = model(view1, view2); out.loss.backward(); opt.step(); model.update_target(tau)
    encoder = byol.load_encoder("encoder.safetensors")      # after `byol export RUN --out ...`

The names below load on first use: ``import byol`` does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "Config": "byol.config", "ConfigError": "byol.config", "load_config": "byol.config",
    "regression_loss": "byol.losses", "symmetric_regression_loss": "byol.losses",
    "BYOL": "byol.models", "MLPHead": "byol.models", "resnet": "byol.models",
    "LARS": "byol.optim", "build_optimizer": "byol.optim", "cosine_tau": "byol.optim",
    "excluded_from_decay_and_adaptation": "byol.optim", "param_groups": "byol.optim",
    "scaled_lr": "byol.optim", "warmup_cosine_lr": "byol.optim",
    "pretrain": "byol.train.pretrain", "load_encoder": "byol.export",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'byol' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
