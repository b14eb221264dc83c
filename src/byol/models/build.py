"""Config -> BYOL model (the only place that reads the Model and Method sections)."""
from __future__ import annotations

import torch

from byol import distributed
from byol.config import Config
from byol.models.backbones import resnet
from byol.models.byol import BYOL
from byol.models.norms import remove_batchnorm


def build_encoder(cfg: Config):
    """The encoder f described by ``cfg.model`` (random init)."""
    m = cfg.model
    # BN-free init (PAPER.md §8): the BN network is built first, with the last norm of each
    # residual block at 0 (the paper's gamma_0 = 0); build_model removes its BN layers.
    return resnet(m.backbone, width=m.width, cifar_stem=m.cifar_stem, norm=m.backbone_norm,
                  zero_init_residual=m.bn_free_init)


def encoder_norm(cfg: Config) -> str:
    """The norm layers of the trained encoder: ``model.backbone_norm``, or "affine" after the
    BN-free init (what ``byol export`` records)."""
    return "affine" if cfg.model.bn_free_init else cfg.model.backbone_norm


def _bn_free_parts(heads: bool) -> tuple[str, ...] | None:
    """What the BN-free init converts: the whole model, or only the encoders (online and target)."""
    return None if heads else ("encoder", "target_encoder")


@torch.no_grad()
def bn_free_init(model: BYOL, x: torch.Tensor, heads: bool = True) -> BYOL:
    """Replace every BN layer of ``model`` (encoders, and heads unless ``heads`` is False; online
    and target) by the affine that reproduces its output on the calibration batch ``x``
    [B, 3, H, W] (PAPER.md §8)."""
    def run():
        model.predictor(model.projector(model.encoder(x)))
        if model.target_mode == "ema":
            model.target_projector(model.target_encoder(x))
    return remove_batchnorm(model, run, only=_bn_free_parts(heads))


def build_model(cfg: Config, *, keep_bn: bool = False) -> BYOL:
    """BYOL(online f, g, q; target f, g) from ``cfg`` (random init from the global RNG). With
    ``model.bn_free_init`` its BN layers are already affine (the structure of a checkpoint) unless
    ``keep_bn``: then ``bn_free_init`` must follow, with a calibration batch."""
    m, method = cfg.model, cfg.method
    encoder = build_encoder(cfg)
    model = BYOL(
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
        queue_size=method.queue_size,
        gather=distributed.gather_with_grad if distributed.world_size() > 1 else None,
        target_init=m.target_init,
        concat_views=m.concat_views,
    )
    if m.bn_free_init and not keep_bn:
        remove_batchnorm(model, only=_bn_free_parts(m.bn_free_heads))
    return model
