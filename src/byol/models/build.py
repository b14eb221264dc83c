"""Config -> BYOL model: the only place that reads the Model and Method sections.

It assembles the method from its parts (docs/method.md §1, §7): the encoder f, the projector g,
the predictor q or none, the target strategy, the loss and, for MoCo, the queue of negatives.
Every string of the config is resolved here, once.
"""
from __future__ import annotations

import torch
from torch import nn

from byol import distributed
from byol.config import Config
from byol.losses import InfoNCELoss, RegressionLoss
from byol.models.backbones import resnet
from byol.models.byol import BYOL
from byol.models.heads import MLPHead
from byol.models.named import is_named, load_init, named_backbone, pretrained_state
from byol.models.norms import remove_batchnorm
from byol.models.queue import NegativeQueue
from byol.models.targets import EMATarget, OnlineTarget, StopGradTarget

# method.target -> the target strategy (model.target_init: how the EMA target starts)
TARGETS = {
    "ema": lambda init: EMATarget(independent=init == "independent"),
    "online_stopgrad": lambda init: StopGradTarget(),
    "online": lambda init: OnlineTarget(),
}


def build_encoder(cfg: Config):
    """The encoder f described by ``cfg.model`` (random init): one of our ResNets, or a named
    torchvision/timm backbone without its classifier (``byol.models.named``; transformers get
    ``augment.size`` as their image size). Our ResNets: ``model.padding`` symmetric (torchvision's)
    or same (TensorFlow's, the released weights'), ``model.zero_init_residual`` (each block's last
    BN scale starts at 0, the release's init; docs/fidelity.md). ``model.init`` is not applied
    here but by :func:`init_encoders`, once, before training."""
    m = cfg.model
    if is_named(m.backbone):
        return named_backbone(m.backbone, image_size=cfg.augment.size)
    # BN-free init (docs/method.md §8): the BN network is built first, with the last norm of each
    # residual block at 0 (the paper's gamma_0 = 0); build_model removes its BN layers.
    return resnet(m.backbone, width=m.width, cifar_stem=m.cifar_stem, norm=m.backbone_norm,
                  zero_init_residual=m.bn_free_init or m.zero_init_residual, padding=m.padding)


@torch.no_grad()
def init_encoders(model: BYOL, cfg: Config) -> BYOL:
    """``model.init`` before the first step: ``pretrained`` (a named backbone's published weights)
    or a state-dict PATH (``named.load_init``) loaded into the online encoder f_θ and, so that
    the target starts where the online network does, into the target encoder f_ξ too (whatever
    ``model.target_init``; the heads keep their random init). A no-op for ``init: null``."""
    init = cfg.model.init
    if init is None:
        return model
    encoders = [model.encoder] + ([model.target_encoder] if hasattr(model, "target_encoder") else [])
    if init == "pretrained":
        state = pretrained_state(cfg.model.backbone, cfg.augment.size)
        for enc in encoders:
            enc.load_state_dict(state, strict=True)
    else:
        for enc in encoders:
            load_init(enc, init)
    return model


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
    [B, 3, H, W] (docs/method.md §8)."""
    return remove_batchnorm(model, lambda: model.calibrate(x), only=_bn_free_parts(heads))


def build_loss(cfg: Config):
    """``method.loss``: the regression loss, or InfoNCE with the batch negatives of every rank."""
    method = cfg.method
    if method.loss == "regression":
        return RegressionLoss()
    gather = distributed.gather_with_grad if distributed.world_size() > 1 else None
    return InfoNCELoss(alpha=method.alpha, beta=method.beta, gather=gather)


def build_queue(cfg: Config) -> NegativeQueue | None:
    """MoCo's queue of ``method.queue_size`` past target projections (every rank's), or None."""
    if not cfg.method.queue_size:
        return None
    gather = distributed.gather if distributed.world_size() > 1 else None
    return NegativeQueue(cfg.method.queue_size, cfg.model.projector_out, gather=gather)


def build_model(cfg: Config, *, keep_bn: bool = False) -> BYOL:
    """BYOL(online f, g, q; target) from ``cfg`` (random init from the global RNG, in the order
    f, g, q, target). With ``model.bn_free_init`` its BN layers are already affine (the structure
    of a checkpoint) unless ``keep_bn``: then ``bn_free_init`` must follow, with a calibration
    batch."""
    m, method = cfg.model, cfg.method
    encoder = build_encoder(cfg)
    projector = MLPHead(encoder.feature_dim, m.projector_hidden, m.projector_out, m.head_norm)
    predictor_norm = m.predictor_norm or m.head_norm
    predictor = (MLPHead(m.projector_out, m.predictor_hidden, m.projector_out, predictor_norm)
                 if method.predictor else nn.Identity())
    model = BYOL(encoder, encoder.feature_dim, projector=projector, predictor=predictor,
                 target=TARGETS[method.target](m.target_init), loss=build_loss(cfg), queue=build_queue(cfg),
                 concat_views=m.concat_views)
    if m.bn_free_init and not keep_bn:
        remove_batchnorm(model, only=_bn_free_parts(m.bn_free_heads))
    return model
