"""The encoder in the formats deployment tools load (``byol export RUN --format F --out FILE``),
each written atomically with the sidecar json that ``byol.export`` writes beside it.

- ``torchvision``: the encoder's state dict (``torch.save``; ``.safetensors`` if FILE says so),
  named as ``torchvision.models.get_model(NAME)``'s: ``load_state_dict(sd, strict=False)``
  reports exactly the classifier's keys missing (``fc.*``, ``classifier.N.*``, ``heads.head.*``),
  or loads strictly once that Linear is replaced by ``nn.Identity()``. Our ResNets map onto
  ``resnetNN`` (same names) at width 1 with the ImageNet stem, BN and symmetric padding only.
- ``timm``: the same for timm backbones; ``timm.create_model(NAME, num_classes=0)`` loads it strictly.
- ``onnx``: ``torch.onnx.export`` of the encoder in eval mode (``pip install 'byol[onnx]'``):
  input ``images`` float32 [batch, 3, S, S] (normalised as the sidecar says), output
  ``features`` [batch, D]; the batch axis is dynamic, S is the training size.
"""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from byol.data.errors import DataError
from byol.files import atomic_path
from byol.models.named import split_backbone

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # no resnet200 there


def _save_state_dict(encoder: nn.Module, out: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)


def save_torchvision(encoder: nn.Module, meta: dict, out: Path) -> None:
    """``--format torchvision``: a state dict for ``torchvision.models.get_model(NAME)`` (module docstring)."""
    backbone = meta["backbone"]
    parts = split_backbone(backbone)
    if parts is not None and parts[0] != "torchvision":
        raise DataError(f"export: --format torchvision needs a torchvision backbone, not {backbone} "
                        f"(use --format {parts[0]})")
    if parts is None:
        ours = {"width": (meta["width"], 1.0), "cifar_stem": (meta["cifar_stem"], False),
                "norm": (meta["norm"], "bn"), "padding": (meta["padding"], "symmetric")}
        bad = [f"{k}={v!r}" for k, (v, want) in ours.items() if v != want]
        if backbone not in TORCHVISION_RESNETS or bad:
            raise DataError(f"export: --format torchvision: torchvision has no {backbone} with "
                            f"{', '.join(bad) or 'this depth'} (it needs {'/'.join(TORCHVISION_RESNETS)} at "
                            "width 1, ImageNet stem, BN, symmetric padding)")
    _save_state_dict(encoder, out)


def save_timm(encoder: nn.Module, meta: dict, out: Path) -> None:
    """``--format timm``: a state dict for ``timm.create_model(NAME, num_classes=0)``."""
    parts = split_backbone(meta["backbone"])
    if parts is None or parts[0] != "timm":
        alt = "torchvision" if parts is None or parts[0] == "torchvision" else "byol"
        raise DataError(f"export: --format timm needs a timm backbone, not {meta['backbone']} (use --format {alt})")
    _save_state_dict(encoder, out)


def save_onnx(encoder: nn.Module, meta: dict, out: Path) -> None:
    """``--format onnx``: images float32 [batch, 3, S, S] -> features [batch, D], dynamic batch."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise DataError("export: --format onnx needs onnx: pip install 'byol[onnx]'") from None
    size = int(meta["image_size"])
    x = torch.zeros(2, 3, size, size)  # 2, not 1: a batch of 1 would be specialised
    encoder = encoder.cpu().eval()
    with atomic_path(out) as tmp:
        torch.onnx.export(encoder, (x,), str(tmp), input_names=["images"], output_names=["features"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))


# --format -> its writer: (encoder, export metadata, out path) -> None
DEPLOY_SAVERS = {"torchvision": save_torchvision, "timm": save_timm, "onnx": save_onnx}
