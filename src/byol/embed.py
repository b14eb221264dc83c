"""``byol embed``: the representations y = f(x) of every image in a folder, with an exported
encoder or the online encoder of a run.

    byol embed encoder.safetensors images/ --out emb.npy  # emb.npy [N, D] + emb.files.txt
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from byol.augment.views import eval_transform
from byol.data.decode import decode_image
from byol.data.errors import DataError
from byol.data.folder import ImageFolderDataset
from byol.data.transforms import eval_crop_fraction
from byol.data.workers import default_workers
from byol.eval.features import extract_features
from byol.export import _run_encoder, is_encoder_file, load_encoder
from byol.files import atomic_path, atomic_write_text
from byol.train.runtime import resolve_device


def encoder_transform(meta: dict):
    """The centre-crop eval transform (docs/method.md §5) matching an encoder's ``byol_meta``:
    uint8 [3, H, W] -> float32 [3, image_size, image_size], normalised."""
    # an export written before byol recorded augment_semantics trained with torchvision's ops
    return eval_transform(meta["image_size"], crop_fraction=meta["eval_crop_fraction"],
                          mean=meta["mean"], std=meta["std"],
                          semantics=meta.get("augment_semantics") or "torchvision")


class _Decoded(Dataset):
    """file i -> (transformed image, i), or (zeros, -1) when it fails to decode: the row is
    dropped afterwards instead of silently replaced by another image, so rows match files."""

    def __init__(self, files: Sequence[Path], transform, size: int) -> None:
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return self.transform(decode_image(self.files[i])), i
        except DataError:
            return torch.zeros(3, self.size, self.size), -1


def _open_encoder(source: str | os.PathLike, device: torch.device) -> tuple[nn.Module, dict]:
    """An encoder file (our ``.safetensors`` export, or a release ``.pkl``), or the online
    encoder of a run dir / checkpoint."""
    if is_encoder_file(source):
        encoder = load_encoder(source)
        return encoder.to(device), encoder.byol_meta
    encoder, arch = _run_encoder(source)
    return encoder.to(device), {**arch, "eval_crop_fraction": eval_crop_fraction(arch["image_size"])}


def embed_folder(encoder_path: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                 *, batch_size: int = 256, device: str = "auto", workers: int | None = None,
                 progress: bool = True) -> dict:
    """``byol embed``: representations y = f(x) [N, D] of every image under ``images``.

    Writes ``out`` (float32 .npy, row i = file i), ``<stem>.files.txt`` (paths relative to
    ``images``, in row order) and, for a labelled folder, ``<stem>.labels.json`` ({classes,
    labels}). Bad files are skipped and listed. Returns {n, dim, out, files, labels, skipped}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"embed: images folder not found: {images}")
    dev = resolve_device(device, what="--device")
    encoder, meta = _open_encoder(encoder_path, dev)
    try:
        folder = ImageFolderDataset(images, bad_files="skip", verify="quick")
    except DataError as e:  # its messages name data.path; here the user gave IMAGES
        raise DataError(str(e).replace("data.path", "embed IMAGES", 1)) from None
    data = _Decoded(folder.files, encoder_transform(meta), meta["image_size"])
    feats, ids = extract_features(encoder, data, batch_size=batch_size, device=dev,
                                  workers=default_workers(workers, dev), progress=progress,
                                  desc="embed")
    keep = (ids >= 0).nonzero().flatten().tolist()
    failed = (ids < 0).nonzero().flatten().tolist()  # passed the quick check, failed to decode
    skipped = [list(s) for s in folder.skipped]
    skipped += [[str(folder.files[i]), "could not be decoded"] for i in failed]
    if not keep:
        raise DataError(f"embed: no image under {images} could be decoded")
    array = feats[keep].numpy().astype(np.float32, copy=False)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    files_txt = out.with_suffix(".files.txt")
    atomic_write_text(files_txt, "".join(folder.files[i].relative_to(folder.root).as_posix() + "\n"
                                   for i in keep))
    labels_json = None
    if folder.labels is not None:
        labels_json = out.with_suffix(".labels.json")
        atomic_write_text(labels_json, json.dumps({"classes": folder.classes,
                                                   "labels": [folder.labels[i] for i in keep]}) + "\n")
    return {"n": len(keep), "dim": array.shape[1], "out": str(out), "files": str(files_txt),
            "labels": None if labels_json is None else str(labels_json), "skipped": skipped}
