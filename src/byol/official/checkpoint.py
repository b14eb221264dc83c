"""The released BYOL checkpoints as our encoders: read (restricted unpickler) and convert.

    model, arch = official_encoder("pretrain_res50x1.pkl")   # our ResNet-50, padding="same"
    byol import-official pretrain_res50x1.pkl --out res50x1.safetensors   # byol.export.import_official

Writing them in our export format is byol.export's (``import_official``, and ``load_encoder`` on
a ``.pkl``); this package knows nothing of that format.

A release checkpoint (utils/checkpointing.py of the release) is a dill pickle, protocol 2, of
``{"experiment_state": _ByolExperimentState(online_params, target_params, online_state,
target_state, opt_state), "step": int, "rng": array}``; params and state are haiku trees
``{module: {leaf: array}}``. The online encoder f_θ is what the release evaluates (and the default
here); ``which="target"`` takes the EMA encoder f_ξ. Images go in as the release feeds them: RGB
in [0, 1], normalised by the ImageNet mean and std (as its experiment does before the network),
here NCHW [B, 3, H, W] instead of its NHWC.

Reading needs the whole pickle in memory (online, target and optimizer state; the unpickler's
memo keeps each array's pickled bytes until the end): on a 300 MB pickle of this format the peak
was 2x its arrays, 1.3x the file, so expect ~0.8 GB for pretrain_res50x1.pkl (570 MB) and ~6 GB
for pretrain_res200x2.pkl (4.6 GB).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from byol.data.errors import DataError
from byol.models.backbones import ResNet, resnet
from byol.official.convert import encoder_state_dict
from byol.official.unpickle import Record, load_pickle

SOURCE_FORMAT = "byol-release"  # the export's ``source_format``: converted from the release's pickle
PADDING = "same"  # haiku's convolutions and max pool pad "SAME"
IMAGE_SIZE = 224  # the release's ImageNet crops
# what the release normalises with (utils/dataset.normalize_images)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OfficialEncoder:
    """One encoder of a release checkpoint: haiku ``params`` and ``state`` (the whole network's:
    the encoder is picked out by name), the training ``step`` and ``which`` (online | target)."""

    params: Mapping[str, Mapping[str, Any]]
    state: Mapping[str, Mapping[str, Any]]
    step: int | None
    which: str


def _field(state: Any, name: str) -> Any:
    if isinstance(state, Record) and state._fields and name in state._fields:
        return getattr(state, name)
    if isinstance(state, Mapping) and name in state:
        return state[name]
    return None


def _tree(value: Any, where: str) -> Mapping[str, Mapping[str, Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise DataError(f"{where} is not a haiku tree of modules")
    return value


def read_official(path: str | os.PathLike, which: str = "online") -> OfficialEncoder:
    """The ``which`` (online | target) encoder's params and state from the release checkpoint at
    ``path``, read with the restricted unpickler (``byol.official.unpickle``). One-line DataError
    naming the file for anything that is not such a checkpoint."""
    if which not in ("online", "target"):
        raise ValueError(f"which must be 'online' or 'target', got {which!r}")
    data = load_pickle(path)
    if not isinstance(data, Mapping) or "experiment_state" not in data:
        raise DataError(f"{path} is not a BYOL release checkpoint (no 'experiment_state')")
    exp = data["experiment_state"]
    params, state = _field(exp, f"{which}_params"), _field(exp, f"{which}_state")
    if params is None and which == "online":  # a linear-eval checkpoint: the frozen backbone
        params, state = _field(exp, "backbone_params"), _field(exp, "backbone_state")
    if params is None or state is None:
        kind = getattr(exp, "source", type(exp).__name__)
        raise DataError(f"{path}: its experiment_state ({kind}) has no {which}_params / {which}_state")
    step = data.get("step")
    try:
        step = None if step is None else int(step)
    except (TypeError, ValueError):
        raise DataError(f"{path}: step is not a number ({type(step).__name__})") from None
    return OfficialEncoder(_tree(params, f"{path}: {which}_params"), _tree(state, f"{path}: {which}_state"),
                           step, which)


def official_encoder(path: str | os.PathLike, which: str = "online") -> tuple[ResNet, dict]:
    """(our ResNet with the release checkpoint's ``which`` encoder, padding="same", eval mode;
    what describes it: backbone, width, cifar_stem, norm, padding, image_size, mean, std,
    augment_semantics and ``source`` (source_checkpoint, step, which, source_format), the keyword
    arguments of ``byol.export.save_encoder``)."""
    enc = read_official(path, which)
    try:
        backbone, width, tensors = encoder_state_dict(enc.params, enc.state)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    model = resnet(backbone, width=width, padding=PADDING)
    model.load_state_dict(tensors, strict=True)
    arch = dict(backbone=backbone, width=width, cifar_stem=False, norm="bn", padding=PADDING,
                image_size=IMAGE_SIZE, mean=MEAN, std=STD, augment_semantics="official",
                source={"source_checkpoint": str(Path(path).resolve()), "step": enc.step, "which": which,
                        "source_format": SOURCE_FORMAT})
    return model.eval(), arch
