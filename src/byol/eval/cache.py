"""On-disk cache of frozen features for the fast linear evaluation (docs/method.md §5).

Extracting features is the slow part of a linear probe; the classifier sweep on top takes
seconds. Features are a pure function of (encoder weights, images, transform), so they are
stored under ``<cache_dir>/<key>.safetensors`` with ``key = sha256(canonical json of key_parts)``.
Callers put into ``key_parts`` everything that changes the features: the checkpoint's sha256
(``LoadedRun.digest``; the seed for a random init), ``byol.eval.data.fingerprint`` of the images
and the transform's repr. Change any of them and the key, hence the file, changes: stale features are
never read, they are only left behind (delete the folder to reclaim the space).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from byol.eval.features import extract_features
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
    return features, labels


def _save(path: Path, features: torch.Tensor, labels: torch.Tensor, key_parts: dict) -> None:
    """Write ``path`` atomically (``byol.files.atomic_path``): a crash never leaves half a file."""
    with atomic_path(path) as tmp:
        # the key's ingredients ride along as metadata, so a cache file can be traced back
        save_file({"features": features.contiguous(), "labels": labels.contiguous()}, str(tmp),
                  metadata={"key_parts": json.dumps(key_parts, sort_keys=True)})


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
    features, labels = extract_features(encoder, dataset, batch_size=batch_size, device=device,
                                        workers=workers, progress=progress, desc=desc)
    labels = labels.long()
    if path is not None:
        _save(path, features, labels, key_parts)
    return Features(features, labels, hit=False)
