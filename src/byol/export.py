"""Export the encoder f (docs/method.md §2) of a run for downstream use and load it back (``byol embed``
is in embed.py).

The exported file is safetensors: a JSON header plus raw tensor bytes, so loading it never runs
code (unlike a pickle, which may import and call anything). It holds only the encoder's
``state_dict`` (BN running statistics included) — no projector, predictor or target — and its
architecture as JSON, both in the safetensors metadata (key ``byol_encoder``) and in a sidecar
``<stem>.json`` for people and tools that do not read safetensors headers.

    byol export runs/r --out encoder.safetensors
    enc = byol.load_encoder("encoder.safetensors")        # torchvision-style ResNet, eval mode
    y = enc(byol.embed.encoder_transform(enc.byol_meta)(image)[None])  # uint8 [3,H,W] -> [1, D]

The released BYOL checkpoints (``byol import-official``, byol/official/) are exports like any
other: their metadata says ``padding: "same"`` (the release's convolutions; format version 2, which
older byol versions refuse rather than misread) and ``source_format: "byol-release"``. Files that
say no ``padding`` are symmetric (torchvision's), as before.

Named backbones (``model.backbone=torchvision/NAME`` or ``timm/NAME``, byol.models.named) export
the same way; the metadata's ``backbone`` is that name, so ``load_encoder`` rebuilds the model
(a timm export needs timm installed: ``pip install 'byol[timm]'``).

Deployment formats (``byol export RUN --format torchvision|timm|onnx``): byol/deploy.py.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from byol.augment.views import IMAGENET_MEAN, IMAGENET_STD
from byol.data.errors import DataError
from byol.data.transforms import eval_crop_fraction
from byol.deploy import DEPLOY_SAVERS
from byol.files import atomic_path, atomic_write_text, sha256_file
from byol.models.backbones import PADDINGS, RESNET_SPECS, resnet
from byol.models.named import TIMM_MISSING, is_named, named_backbone, split_backbone
from byol.models.norms import BACKBONE_NORMS
from byol.train.runtime import resolve_device

FORMAT = "byol-encoder"
FORMAT_VERSION = 2  # 2: ``padding`` ("same" needs it); symmetric exports are still written as 1
METADATA_KEY = "byol_encoder"
EXPORT_FORMATS = ("byol", "torchvision", "timm", "onnx")


def sidecar_path(out: str | os.PathLike) -> Path:
    """``encoder.safetensors`` -> ``encoder.json`` (the human-readable architecture)."""
    return Path(out).with_suffix(".json")


def _refuse_overwrite(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise DataError(f"export: {out} already exists (pass --force to overwrite)")


def save_encoder(encoder: nn.Module, out: str | os.PathLike, *, backbone: str, width: float = 1.0,
                 cifar_stem: bool = False, norm: str = "bn", padding: str = "symmetric",
                 image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, augment_semantics: str | None = None,
                 source: dict | None = None, force: bool = False) -> dict:
    """Write an encoder f (a ``byol.models.backbones.ResNet``) as safetensors + sidecar json.

    ``backbone``/``width``/``cifar_stem``/``norm``/``padding`` must describe ``encoder`` (checked
    against a shape-only model; padding is recorded, it changes no shape); ``image_size``/``mean``/
    ``std`` are what it was trained on, for the eval transform, and ``augment_semantics`` whose ops
    it was trained with (``augment.semantics``: official | torchvision; None: unknown); ``source``
    adds provenance (checkpoint, step). Refuses to overwrite ``out`` unless ``force``. Returns the
    architecture metadata.
    """
    out = Path(out)
    _refuse_overwrite(out, force)
    meta = encoder_meta(encoder, backbone=backbone, width=width, cifar_stem=cifar_stem, norm=norm,
                        padding=padding, image_size=image_size, mean=mean, std=std,
                        augment_semantics=augment_semantics, source=source)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    # Sidecar first: once ``out`` exists under its final name, the export is complete.
    atomic_write_text(sidecar_path(out), json.dumps(meta, indent=2) + "\n")
    with atomic_path(out) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt",
                                                                 METADATA_KEY: json.dumps(meta)})
    return meta


def encoder_meta(encoder: nn.Module, *, backbone: str, width: float = 1.0, cifar_stem: bool = False,
                 norm: str = "bn", padding: str = "symmetric", image_size: int = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment_semantics: str | None = None, source: dict | None = None) -> dict:
    """The architecture metadata ``save_encoder`` writes for ``encoder`` (what ``load_encoder``
    puts in ``.byol_meta``), after checking that the arguments describe it."""
    from byol import __version__

    if backbone not in RESNET_SPECS and not is_named(backbone):
        raise ValueError(f"backbone must be one of {', '.join(RESNET_SPECS)}, torchvision/NAME or timm/NAME, "
                         f"got {backbone!r}")
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    if getattr(encoder, "padding", padding) != padding:
        raise ValueError(f"encoder pads {encoder.padding!r}, not padding={padding!r}")
    shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    with torch.device("meta"):  # shapes only: no memory, no init cost even for ResNet-200 4x
        shape_only = (named_backbone(backbone, image_size=image_size) if is_named(backbone)
                      else resnet(backbone, width=width, cifar_stem=cifar_stem, norm=norm))
        expected = {k: v.shape for k, v in shape_only.state_dict().items()}
    if shapes != expected:
        raise ValueError(f"encoder does not match backbone={backbone} width={width} "
                         f"cifar_stem={cifar_stem} norm={norm} (state_dict keys or shapes differ)")
    meta = {
        "format": FORMAT, "version": 1 if padding == "symmetric" else 2, "backbone": backbone,
        "width": width, "cifar_stem": cifar_stem, "norm": norm, "padding": padding,
        "feature_dim": encoder.feature_dim, "image_size": image_size, "augment_semantics": augment_semantics,
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "eval_crop_fraction": eval_crop_fraction(image_size), "source_checkpoint": None,
        "step": None, **(source or {}), "byol_version": __version__,
    }
    return meta


def _run_encoder(run_or_checkpoint: str | os.PathLike, which: str = "online") -> tuple[nn.Module, dict]:
    """-> (encoder f of a run, in eval mode; its metadata as ``save_encoder`` writes it)."""
    from byol.eval.commands import load_checkpoint_run
    from byol.models.build import encoder_norm

    if which not in ("online", "target"):
        raise ValueError(f"which must be 'online' or 'target', got {which!r}")
    loaded = load_checkpoint_run(run_or_checkpoint)
    cfg, model, ckpt = loaded.cfg, loaded.model, loaded.checkpoint
    if which == "target" and not hasattr(model, "target_encoder"):
        raise DataError(f"{ckpt} has no target encoder (method.target={cfg.method.target})")
    encoder = model.encoder if which == "online" else model.target_encoder
    m, aug = cfg.model, cfg.augment
    meta = dict(backbone=m.backbone, width=m.width, cifar_stem=m.cifar_stem, norm=encoder_norm(cfg),
                padding=m.padding, image_size=aug.eval_px, mean=aug.mean, std=aug.std,
                augment_semantics=aug.semantics,
                source={"source_checkpoint": str(ckpt), "step": loaded.step,
                        "which": which})
    return encoder.eval(), meta


def export_encoder(run_or_checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                   which: str = "online", force: bool = False, format: str = "byol") -> dict:
    """``byol export``: the online encoder f_θ of a run dir or checkpoint -> ``out`` + ``<stem>.json``.
    ``which="target"`` exports the EMA encoder f_ξ instead. ``format``: byol (safetensors, for
    ``load_encoder``; the default), torchvision, timm or onnx (the module docstring). Returns the
    metadata plus ``out``, ``sidecar``, ``num_tensors`` and ``export_format``."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export: --format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    _refuse_overwrite(Path(out), force)  # before loading a possibly large checkpoint
    encoder, arch = _run_encoder(run_or_checkpoint, which)
    if format == "byol":
        meta = save_encoder(encoder, out, force=force, **arch)
    else:
        meta = encoder_meta(encoder, **arch)
        DEPLOY_SAVERS[format](encoder, meta, Path(out))
        atomic_write_text(sidecar_path(out), json.dumps({**meta, "export_format": format}, indent=2) + "\n")
    return {**meta, "out": str(out), "sidecar": str(sidecar_path(out)),
            "num_tensors": len(encoder.state_dict()), "export_format": format}


def _read_meta(path: Path) -> dict:
    """The architecture of an exported encoder: safetensors metadata, else the sidecar json."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # only a header was parsed, no code ran; any failure means "not ours"
        raise DataError(f"{path} is not a safetensors file") from None
    sidecar = sidecar_path(path)
    try:
        if METADATA_KEY in header:
            meta = json.loads(header[METADATA_KEY])
        elif sidecar.is_file():
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        else:
            raise DataError(f"{path} is not a byol encoder (no {METADATA_KEY!r} metadata and no "
                            f"sidecar {sidecar.name})")
    except json.JSONDecodeError:
        raise DataError(f"{path} is not a byol encoder (its architecture json is invalid)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a byol encoder (format is not {FORMAT!r})")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise DataError(f"{path}: encoder format {meta['version']} is newer than this byol reads "
                        f"({FORMAT_VERSION}); upgrade byol")
    named = split_backbone(str(meta.get("backbone")))
    if meta.get("backbone") not in RESNET_SPECS and named is None:
        raise DataError(f"{path}: unknown backbone {meta.get('backbone')!r} "
                        f"(known: {', '.join(RESNET_SPECS)}, torchvision/NAME, timm/NAME)")
    if named is not None and named[0] == "timm":
        try:
            import timm  # noqa: F401
        except ImportError:
            raise DataError(f"{path}: its backbone {meta['backbone']} needs timm: {TIMM_MISSING}") from None
    if meta.setdefault("norm", "bn") not in BACKBONE_NORMS:  # files before "norm" are BN ResNets
        raise DataError(f"{path}: unknown norm {meta['norm']!r} (known: {', '.join(BACKBONE_NORMS)})")
    if meta.setdefault("padding", "symmetric") not in PADDINGS:  # files before "padding": symmetric
        raise DataError(f"{path}: unknown padding {meta['padding']!r} (known: {', '.join(PADDINGS)})")
    return meta


def _build_for(meta: dict, path: Path) -> nn.Module:
    """The (random-init) encoder an export's metadata describes."""
    if is_named(meta["backbone"]):
        try:
            return named_backbone(meta["backbone"], image_size=int(meta["image_size"]))
        except ValueError as e:  # a model this torchvision/timm version does not have
            raise DataError(f"{path}: {e}") from None
    return resnet(meta["backbone"], width=meta["width"], cifar_stem=meta["cifar_stem"], norm=meta["norm"],
                  padding=meta["padding"])


def load_encoder(path: str | os.PathLike, *, device: str = "cpu") -> nn.Module:
    """Load an exported encoder f: a ``byol.models.backbones.ResNet`` (torchvision-style), or the
    torchvision/timm model of a named backbone without its head (forward [B, 3, H, W] -> [B, D]),
    in eval mode on ``device``, with ``.byol_meta`` (image_size, mean, std, eval_crop_fraction,
    padding, ...; see ``encoder_transform``). Never unpickles anything,
    except a released BYOL checkpoint (``*.pkl``): its online encoder, converted on the fly
    (``byol.official``), read with a restricted unpickler that refuses, without running it,
    anything but arrays and records."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"encoder file not found: {path}")
    if not path.is_file():
        raise DataError(f"encoder path is not a file: {path}")
    dev = resolve_device(device, what="device")
    if path.suffix == ".pkl":
        return load_official(path).to(dev)
    meta = _read_meta(path)
    encoder = _build_for(meta, path)
    try:
        encoder.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shape mismatch
        detail = " ".join(str(e).split())[:300]
        raise DataError(f"{path}: tensors do not match {meta['backbone']} width={meta['width']}: "
                        f"{detail}") from None
    except Exception:
        raise DataError(f"{path} is not a valid safetensors file (corrupt tensor data)") from None
    encoder.byol_meta = meta
    return encoder.to(dev).eval()


def load_official(path: str | os.PathLike, which: str = "online") -> nn.Module:
    """The ``which`` (online | target) encoder of a released BYOL checkpoint (``.pkl``), converted
    (byol.official) and returned as ``load_encoder`` returns an export: eval mode, ``.byol_meta``
    as ``import_official`` would write it."""
    from byol.official import official_encoder

    model, arch = official_encoder(path, which)
    model.byol_meta = encoder_meta(model, **arch)
    return model


def import_official(path: str | os.PathLike, out: str | os.PathLike, *, which: str = "online",
                    force: bool = False) -> dict:
    """``byol import-official``: the released BYOL checkpoint at ``path`` (byol.official) -> an
    encoder export ``out`` (safetensors + ``<stem>.json``, as ``byol export`` writes; its metadata
    says ``padding: "same"`` and ``source_format: "byol-release"``). Returns the metadata plus
    ``out``, ``sidecar`` and ``num_tensors``."""
    from byol.official import official_encoder

    _refuse_overwrite(Path(out), force)  # before reading a possibly 4.6 GB pickle
    model, arch = official_encoder(path, which)
    meta = save_encoder(model, out, force=force, **arch)
    return {**meta, "out": str(out), "sidecar": str(sidecar_path(out)), "num_tensors": len(model.state_dict())}


ENCODER_SUFFIXES = (".safetensors", ".pkl")  # an export; a released BYOL checkpoint (byol.official)


def is_encoder_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an encoder file (an export, or a release checkpoint) rather than a
    run directory or one of our pretraining checkpoints."""
    return Path(path).suffix in ENCODER_SUFFIXES


def export_as_run(path: str | os.PathLike):
    """An exported encoder (or a release checkpoint) as the ``LoadedRun`` the ``byol eval``
    commands take (byol.eval.commands): the config its metadata describes (model and the eval
    transform: size, mean, std, augment semantics; every other section at its default), a model
    holding ``.encoder``, no run directory (results are printed, not written) and the file's
    sha256 as its identity (the fast linear eval's feature cache keys on it). It has no data of
    its own: evaluate it on --train and --test folders."""

    from byol.config import config_from_dict
    from byol.eval.commands import LoadedRun

    path = Path(path)
    encoder = load_encoder(path)
    meta = encoder.byol_meta
    affine = meta["norm"] == "affine"  # the BN-free init's structure (model.bn_free_init)
    model = {"backbone": meta["backbone"], "width": meta["width"], "cifar_stem": meta["cifar_stem"],
             "padding": meta["padding"], "backbone_norm": "bn" if affine else meta["norm"],
             "bn_free_init": affine}
    if is_named(meta["backbone"]):  # the options of our ResNets stay at their defaults
        model = {"backbone": meta["backbone"]}
    # no augment_semantics: an export written before byol recorded it, so torchvision's ops
    augment = {"size": meta["image_size"], "mean": list(meta["mean"]), "std": list(meta["std"]),
               "semantics": meta.get("augment_semantics") or "torchvision"}
    cfg = config_from_dict({"model": model, "augment": augment})
    holder = nn.Module()
    holder.encoder = encoder
    return LoadedRun(cfg, holder, path, None, int(meta.get("step") or 0), None, sha256_file(path))
