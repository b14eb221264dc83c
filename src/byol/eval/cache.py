"""On-disk cache of frozen features for the fast linear evaluation (docs/method.md §5).

Extracting features is the slow part of a linear probe; the classifier sweep on top takes
seconds. Features are a pure function of (encoder weights, images, transform), so they are
stored under ``<cache_dir>/<key>.safetensors`` with ``key = sha256(canonical json of key_parts)``.
Callers put into ``key_parts`` everything that changes the features: the checkpoint's sha256
(``LoadedRun.digest``; the seed for a random init), ``byol.eval.data.fingerprint`` of the images
and the transform's repr. Change any of them and the key, hence the file, changes: stale features are
never read, they are only left behind (delete the folder to reclaim the space).

The file is written as the features come: its safetensors header (labels I64 [N], then features
F32 [N, D]) first, then each batch's rows into memory maps of the two tensors, so extraction never
holds all N features in memory. It is built under a temp name and renamed into place when full
(``byol.files.atomic_path``): a crash never leaves a complete-looking partial file. Reading goes
through ``safetensors.load_file`` only: a pickle under a cache name is never run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

from byol.eval.features import extract_features, iter_features
from byol.files import atomic_path

# Part of every key: bump it when the stored layout or the extraction itself changes.
CACHE_FORMAT = 1


class Features(NamedTuple):
    """Frozen features [N, D] float32 and labels [N] int64 (CPU); ``hit``: read from the cache."""

    features: torch.Tensor
    labels: torch.Tensor
    hit: bool


def cache_key(key_parts: dict) -> str:
    """sha256 hex of ``key_parts`` as canonical JSON (sorted keys): equal dicts, equal keys."""
    text = json.dumps({"format": CACHE_FORMAT, **key_parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _load(path: Path, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (features, labels) of ``n`` samples, or None when missing or unusable."""
    if not path.is_file():
        return None
    try:
        stored = load_file(path)
        features, labels = stored["features"], stored["labels"]
    except Exception:  # truncated, corrupt or foreign file: recompute and overwrite it
        return None
    if features.dim() != 2 or features.shape[0] != n or labels.shape != (n,):
        return None
    # load_file may map the file: own copies, unaffected when the file is later rewritten
    return features.clone(), labels.clone()


def _save(path: Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n: int, key_parts: dict) -> None:
    """Write ``path`` from ``batches`` of (features [B, D] float32, labels [B]) covering ``n``
    samples in order, each batch straight into a memory map of the file; atomically
    (``byol.files.atomic_path``): a crash never leaves half a file under its name."""
    with atomic_path(path) as tmp:
        labels = features = None
        done = 0
        for feats, ys in batches:
            if feats.dim() != 2:
                raise ValueError(f"features must be [B, D], got {tuple(feats.shape)}")
            if features is None:  # D is known from the first batch: the header, then the maps
                d = feats.shape[1]
                # the key's ingredients ride along as metadata, so a cache file can be traced back
                header = {"__metadata__": {"key_parts": json.dumps(key_parts, sort_keys=True)},
                          "labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
                          "features": {"dtype": "F32", "shape": [n, d],
                                       "data_offsets": [8 * n, 8 * n + 4 * n * d]}}
                text = json.dumps(header, separators=(",", ":")).encode()
                text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
                start = 8 + len(text)
                with open(tmp, "wb") as f:
                    f.write(struct.pack("<Q", len(text)) + text)
                    f.truncate(start + 8 * n + 4 * n * d)
                labels = np.memmap(tmp, dtype="<i8", mode="r+", offset=start, shape=(n,))
                features = np.memmap(tmp, dtype="<f4", mode="r+", offset=start + 8 * n, shape=(n, d))
            b = feats.shape[0]
            if done + b > n:
                raise ValueError(f"the dataset yielded more than its {n} samples")
            features[done:done + b] = feats.numpy()
            labels[done:done + b] = ys.long().numpy()
            done += b
        if features is None or done != n:
            raise ValueError(f"the dataset yielded {done} of its {n} samples")
        features.flush()
        labels.flush()
        del features, labels


def cached_features(
    encoder: nn.Module,
    dataset: Dataset,
    *,
    cache_dir: Path | None,
    key_parts: dict,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
) -> Features:
    """Frozen features of ``dataset`` (encoder in eval mode): from ``cache_dir`` when stored
    under ``key_parts``, else extracted and stored. ``cache_dir=None`` disables the cache."""
    path = None if cache_dir is None else Path(cache_dir) / f"{cache_key(key_parts)}.safetensors"
    if path is not None and (stored := _load(path, len(dataset))) is not None:
        return Features(*stored, hit=True)
    if path is None:
        features, labels = extract_features(encoder, dataset, batch_size=batch_size, device=device,
                                            workers=workers, progress=progress, desc=desc)
        return Features(features, labels.long(), hit=False)
    batches = iter_features(encoder, dataset, batch_size=batch_size, device=device, workers=workers,
                            progress=progress, desc=desc)
    with contextlib.closing(batches):
        _save(path, batches, len(dataset), key_parts)
    stored = _load(path, len(dataset))
    if stored is None:  # cannot happen short of a disk fault: the file was just written
        raise OSError(f"the feature cache {path} cannot be read back")
    return Features(*stored, hit=False)
