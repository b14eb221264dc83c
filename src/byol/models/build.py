"""Config -> BYOL model (the only place that reads the Model and Method sections)."""
from __future__ import annotations

from byol.config import Config
from byol.models.backbones import resnet
from byol.models.byol import BYOL


def build_encoder(cfg: Config):
    """The encoder f described by ``cfg.model`` (random init)."""
    m = cfg.model
    return resnet(m.backbone, width=m.width, cifar_stem=m.cifar_stem)


def build_model(cfg: Config) -> BYOL:
    """BYOL(online f, g, q; target f, g) from ``cfg`` (random init from the global RNG)."""
    m, method = cfg.model, cfg.method
    encoder = build_encoder(cfg)
    return BYOL(
        encoder,
        encoder.feature_dim,
        projector_hidden=m.projector_hidden,
        projector_out=m.projector_out,
        predictor_hidden=m.predictor_hidden,
        head_norm=m.head_norm,
        predictor_norm=m.predictor_norm,
        predictor=method.predictor,
        target=method.target,
        loss=method.loss,
        alpha=method.alpha,
        beta=method.beta,
        target_init=m.target_init,
        concat_views=m.concat_views,
    )
