"""Encoders f (docs/method.md §2) by name from torchvision or timm: ``model.backbone=torchvision/NAME``
or ``model.backbone=timm/NAME``, beside our ResNets (``resnet18``..``resnet200``, the default).

    f = named_backbone("timm/convnext_atto", image_size=32)   # [B, 3, 32, 32] -> [B, f.feature_dim]
    f = named_backbone("torchvision/mobilenet_v3_small", image_size=64)

The classifier head is removed so that f returns the pooled representation y [B, D]:

- timm: ``num_classes=0`` (timm's own way); D is ``head_hidden_size`` (models with a pre-logits
  layer, e.g. MobileNetV3's 1024-wide conv head) or ``num_features``.
- torchvision: the last ``nn.Linear`` of the model (its classifier: ``fc`` of ResNet/RegNet/
  ResNeXt, ``classifier[-1]`` of EfficientNet/MobileNet/ConvNeXt, ``heads.head`` of ViT, ``head``
  of Swin) becomes ``nn.Identity``; D is that Linear's ``in_features``. Hidden classifier layers
  before it stay (MobileNetV3's 1024-wide layer, as timm keeps its conv head).

The state-dict names are the library's own minus the head, so ``byol export --format torchvision``
(or ``timm``) writes a file that ``torchvision.models.get_model(NAME)`` loads with ``strict=False``
missing only the classifier (``timm.create_model(NAME, num_classes=0)`` strictly).

Image size: transformers fix their position embeddings at build time, so models that take an
image size get the training size (timm ``img_size``, torchvision ViT ``image_size``).

``model.width``, ``cifar_stem``, ``padding``, ``backbone_norm``, ``zero_init_residual`` and
``bn_free_init`` describe our ResNets only; the config refuses them with a named backbone.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import nn

SOURCES = ("torchvision", "timm")
TIMM_MISSING = "timm is not installed: pip install 'byol[timm]'"
# Families without convolutions after the patch embedding: NHWC helps no kernel there
TRANSFORMER_PREFIXES = ("vit", "deit", "swin", "beit", "eva", "cait", "xcit", "maxvit", "test_vit")


class BackboneError(ValueError):
    """A user mistake with a named backbone (unknown name, timm missing, weights offline); one line."""


def split_backbone(backbone: str) -> tuple[str, str] | None:
    """``"timm/convnext_atto"`` -> ("timm", "convnext_atto"); our ResNets ("resnet50") -> None."""
    source, sep, name = backbone.partition("/")
    return (source, name) if sep and source in SOURCES else None


def is_named(backbone: str) -> bool:
    """Whether ``backbone`` names a torchvision or timm model (not one of our ResNets)."""
    return split_backbone(backbone) is not None


def is_convolutional(backbone: str) -> bool:
    """Whether channels_last (NHWC) helps ``backbone``: our ResNets and named convnets yes,
    vision transformers (ViT, DeiT, Swin, ...) no."""
    parts = split_backbone(backbone)
    return parts is None or not parts[1].startswith(TRANSFORMER_PREFIXES)


def _close(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f" (close: {', '.join(close)})" if close else ""


def torchvision_names() -> list[str]:
    """The classification models of ``torchvision.models`` (not detection, video, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_torchvision_name(name: str) -> str | None:
    """None if ``name`` is a torchvision classification model, else the one-line reason."""
    names = torchvision_names()
    if name in names:
        return None
    return f"unknown torchvision model {name!r}{_close(name, names)}"


def import_timm():
    """The ``timm`` module, or a one-line BackboneError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise BackboneError(TIMM_MISSING) from None
    return timm


def _offline(what: str, exc: BaseException) -> BackboneError:
    detail = " ".join(str(exc).split())[:160]
    return BackboneError(f"model.init=pretrained: could not download the weights of {what} "
                        f"(offline? put them in the cache or pass model.init=PATH): {detail}")


_DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError)


def _torchvision(name: str, image_size: int, pretrained: bool) -> nn.Module:
    import torchvision

    if (reason := check_torchvision_name(name)) is not None:
        raise BackboneError(f"model.backbone: {reason}")
    kwargs: dict = {}
    if name.startswith("vit_") and not pretrained:  # pretrained ViTs are fixed at their size
        kwargs["image_size"] = image_size
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    try:
        net = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
    except _DOWNLOAD_ERRORS as e:
        raise _offline(f"torchvision/{name}", e) from None
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model.backbone: torchvision/{name} has no Linear classifier to remove")
    head_name, head = linears[-1]
    parent = net.get_submodule(head_name.rpartition(".")[0]) if "." in head_name else net
    setattr(parent, head_name.rpartition(".")[2], nn.Identity())
    net.feature_dim = head.in_features
    net.byol_head = head_name  # the classifier's state-dict prefix (what --format torchvision omits)
    return net


def _timm(name: str, image_size: int, pretrained: bool) -> nn.Module:
    timm = import_timm()
    try:
        try:
            net = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=image_size)
        except TypeError:  # this family takes no image size (convnets)
            net = timm.create_model(name, pretrained=pretrained, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            names = timm.list_models()
            raise BackboneError(f"model.backbone: unknown timm model {name!r}{_close(name, names)}") from None
        raise
    except _DOWNLOAD_ERRORS as e:
        raise _offline(f"timm/{name}", e) from None
    except Exception as e:  # huggingface_hub's offline errors are not OSErrors in every version
        if pretrained and type(e).__module__.startswith(("huggingface_hub", "requests", "urllib3")):
            raise _offline(f"timm/{name}", e) from None
        raise
    net.feature_dim = int(getattr(net, "head_hidden_size", None) or net.num_features)
    net.byol_head = None
    return net


def named_backbone(backbone: str, *, image_size: int = 224, pretrained: bool = False) -> nn.Module:
    """``backbone`` ("torchvision/NAME" | "timm/NAME") without its classifier: images
    [B, 3, H, W] -> y [B, feature_dim], random init (``pretrained``: the library's published
    weights, downloaded or from its cache; a one-line BackboneError when offline). ``image_size``
    fixes the position embeddings of transformers. The module gets ``feature_dim`` and
    ``byol_backbone`` (the name, what an export records)."""
    parts = split_backbone(backbone)
    if parts is None:
        raise ValueError(f"model.backbone: {backbone!r} is not torchvision/NAME or timm/NAME")
    source, name = parts
    net = (_torchvision if source == "torchvision" else _timm)(name, image_size, pretrained)
    net.byol_backbone = backbone
    return net


# -- model.init: weights for the encoder before training ------------------------------------------

_WRAPPERS = ("state_dict", "model", "module")
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "head_drop.", "last_linear.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            return safetensors.torch.load_file(str(path))
        except Exception:
            raise ValueError(f"model.init: {path} is not a valid safetensors file") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        detail = " ".join(str(e).split())[:120]
        raise ValueError(f"model.init: {path} is not a state dict torch.load(weights_only=True) reads: "
                         f"{detail}") from None
    for _ in range(2):  # {"state_dict": {...}}, {"model": {...}}, a checkpoint's {"model": {"encoder.*"}}
        if isinstance(sd, dict):
            wrapped = [k for k in _WRAPPERS if isinstance(sd.get(k), dict)]
            if wrapped and not any(isinstance(v, torch.Tensor) for v in sd.values()):
                sd = sd[wrapped[0]]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.init: {path} holds no state dict of tensors")
    return sd


def _strip(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Keys of ``sd`` made to match ``expected``: a "module." (DDP) or "encoder." (our checkpoints)
    prefix dropped, a classifier head's keys left out."""
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not set(sd) & expected and any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    return {k: v for k, v in sd.items() if k in expected or not k.startswith(_HEAD_PREFIXES)}


def load_init(encoder: nn.Module, path: str | os.PathLike) -> None:
    """``model.init=PATH``: load a local state dict (.pt/.pth via ``torch.load(weights_only=True)``,
    or .safetensors; optionally wrapped in a ``state_dict``/``model`` key) into ``encoder`` in
    place. A classifier head's keys are dropped; any other missing or unexpected key, or a shape
    mismatch, is a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.init: file not found: {path}")
    own = encoder.state_dict()
    sd = _strip(_read_state_dict(path), set(own))
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
        raise ValueError(f"model.init: {path} does not match the encoder: {'; '.join(parts)}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(f"model.init: {path}: {k} has shape {tuple(v.shape)}, the encoder's is "
                             f"{tuple(own[k].shape)}")
    encoder.load_state_dict(sd, strict=False)


def pretrained_state(backbone: str, image_size: int) -> dict[str, torch.Tensor]:
    """``model.init=pretrained``: the published weights of a named backbone (torchvision
    ``weights="DEFAULT"``, timm ``pretrained=True``), headless, as a state dict."""
    if not is_named(backbone):
        raise ValueError(f"model.init=pretrained needs a torchvision/NAME or timm/NAME backbone, got "
                         f"{backbone!r} (for our ResNets pass model.init=PATH)")
    return named_backbone(backbone, image_size=image_size, pretrained=True).state_dict()
