"""``byol embed``: the representations y = f(x) of every image in a folder, with an exported
encoder or the online encoder of a run.

    byol embed encoder.safetensors images/ --out emb.npy  # emb.npy [N, D] + emb.files.txt
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
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
from byol.eval.features import iter_features
from byol.export import _run_encoder, is_encoder_file, load_encoder
from byol.files import atomic_path, atomic_write_text, fsync_dir
from byol.train.runtime import resolve_device

# Part of the identity a stopped run is resumed under: bump it when the partial layout changes.
PROGRESS_FORMAT = 1
# The compaction that drops the rows of undecodable files copies this many bytes of rows at a time.
COPY_CHUNK_BYTES = 1 << 24


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


def _digest_encoder(encoder: nn.Module) -> str:
    """sha256 of the encoder's weights and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")  # no copy
    return h.hexdigest()


def _digest_files(folder: ImageFolderDataset) -> str:
    """sha256 of the image list in row order: relative path, size and mtime of every file."""
    h = hashlib.sha256()
    for p in folder.files:
        st = p.stat()
        h.update(f"{p.relative_to(folder.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _partial_paths(out: Path) -> tuple[Path, Path]:
    """(``<out>.partial``: the [N, D] float32 .npy being filled, ``<out>.progress.json``)."""
    return out.with_name(out.name + ".partial"), out.with_name(out.name + ".progress.json")


def _resume_point(partial: Path, progress_file: Path, identity: dict, n: int,
                  resume: bool) -> tuple[np.memmap | None, int, list[int]]:
    """(the partial memmap [N, D] opened r+, rows done, failed rows) to continue a stopped run with
    the same ``identity``; (None, 0, []) to start over (a notice when a stopped run is discarded)."""
    if not progress_file.is_file():
        return None, 0, []
    try:
        state = json.loads(progress_file.read_text())
        if not resume or state.get("identity") != identity:
            raise LookupError
        done, failed, dim = int(state["rows_done"]), [int(i) for i in state["failed"]], int(state["dim"])
        rows = np.lib.format.open_memmap(partial, mode="r+")
        if rows.shape != (n, dim) or rows.dtype != np.float32 or not 0 < done <= n:
            raise ValueError
    except LookupError:
        why = "--no-resume" if not resume else "other encoder, images or transform"
        print(f"embed: starting over, discarding the stopped run in {partial} ({why})", file=sys.stderr)
        return None, 0, []
    except (OSError, ValueError, KeyError, TypeError):
        print(f"embed: starting over, the stopped run in {partial} is unreadable", file=sys.stderr)
        return None, 0, []
    return rows, done, failed


def _write_progress(progress_file: Path, rows: np.memmap, identity: dict, done: int, failed: list[int]) -> None:
    """Flush the rows to disk, then record that the first ``done`` are final (atomically)."""
    rows.flush()
    atomic_write_text(progress_file, json.dumps({"identity": identity, "dim": rows.shape[1],
                                                 "rows_done": done, "failed": failed}) + "\n")


def embed_folder(encoder_path: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                 *, batch_size: int = 256, device: str = "auto", workers: int | None = None,
                 progress: bool = True, resume: bool = True, save_every: int = 16) -> dict:
    """``byol embed``: representations y = f(x) [N, D] of every image under ``images``.

    Writes ``out`` (float32 .npy, row i = file i), ``<stem>.files.txt`` (paths relative to
    ``images``, in row order) and, for a labelled folder, ``<stem>.labels.json`` ({classes,
    labels}). Bad files are skipped and listed. Returns {n, dim, out, files, labels, skipped,
    resumed_at}.

    Rows go to disk as they are computed, never all in memory: into ``<out>.partial``, a
    memory-mapped .npy [N_found, D] float32, and every ``save_every`` batches the memmap is
    flushed and ``<out>.progress.json`` records how many rows are final (with the encoder's
    weights digest, the transform and the image list's digest). A stopped run called again with
    the same encoder, images and transform continues from there (``resume=False``: starts over).
    At the end the rows of the files that decoded are copied in chunks into ``out`` (renamed
    into place atomically: ``out`` exists complete or not at all) and the partial files removed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    images, out = Path(images), Path(out)
    if not images.is_dir():
        raise DataError(f"embed: images folder not found: {images}")
    dev = resolve_device(device, what="--device")
    encoder, meta = _open_encoder(encoder_path, dev)
    try:
        folder = ImageFolderDataset(images, bad_files="skip", verify="quick")
    except DataError as e:  # its messages name data.path; here the user gave IMAGES
        raise DataError(str(e).replace("data.path", "embed IMAGES", 1)) from None
    transform = encoder_transform(meta)
    data = _Decoded(folder.files, transform, meta["image_size"])
    n = len(data)
    identity = {"version": PROGRESS_FORMAT, "encoder": _digest_encoder(encoder), "transform": repr(transform),
                "image_size": meta["image_size"], "files": _digest_files(folder), "n": n}
    partial, progress_file = _partial_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, done, failed = _resume_point(partial, progress_file, identity, n, resume)
    resumed_at = done if rows is not None else None
    if rows is not None:
        print(f"embed: resuming at row {done} of {n}", file=sys.stderr)
    batches = iter_features(encoder, data, batch_size=batch_size, device=dev, start=done,
                            workers=default_workers(workers, dev), progress=progress, desc="embed")
    with contextlib.closing(batches):
        for k, (feats, ids) in enumerate(batches, 1):
            if rows is None:  # D is known from the first batch
                progress_file.unlink(missing_ok=True)
                rows = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32,
                                                 shape=(n, feats.shape[1]))
            rows[done:done + len(ids)] = feats.numpy()
            failed += [done + j for j in (ids < 0).nonzero().flatten().tolist()]
            done += len(ids)
            if k % save_every == 0:
                _write_progress(progress_file, rows, identity, done, failed)
    if rows is None:  # an empty folder is refused by ImageFolderDataset; kept for safety
        raise DataError(f"embed: no image under {images} could be decoded")
    bad = set(failed)  # passed the quick check, failed to decode
    keep = [i for i in range(n) if i not in bad]
    skipped = [list(s) for s in folder.skipped]
    skipped += [[str(folder.files[i]), "could not be decoded"] for i in sorted(bad)]
    if not keep:  # a finished run, with nothing to keep: no stopped run to resume either
        del rows
        partial.unlink(missing_ok=True)
        progress_file.unlink(missing_ok=True)
        raise DataError(f"embed: no image under {images} could be decoded")
    dim = rows.shape[1]
    files_txt = out.with_suffix(".files.txt")
    atomic_write_text(files_txt, "".join(folder.files[i].relative_to(folder.root).as_posix() + "\n"
                                   for i in keep))
    labels_json = None
    if folder.labels is not None:
        labels_json = out.with_suffix(".labels.json")
        atomic_write_text(labels_json, json.dumps({"classes": folder.classes,
                                                   "labels": [folder.labels[i] for i in keep]}) + "\n")
    _finish(rows, partial, out, keep)
    progress_file.unlink(missing_ok=True)
    return {"n": len(keep), "dim": dim, "out": str(out), "files": str(files_txt),
            "labels": None if labels_json is None else str(labels_json), "skipped": skipped,
            "resumed_at": resumed_at}


def _finish(rows: np.memmap, partial: Path, out: Path, keep: list[int]) -> None:
    """``out`` <- rows ``keep`` of the partial memmap [N, D], atomically; removes ``partial``.
    All rows kept: the partial file itself is renamed into place. Else they are copied into a new
    memmap [len(keep), D] ``COPY_CHUNK_BYTES`` at a time (memory bounded whatever N)."""
    rows.flush()
    if len(keep) == rows.shape[0]:
        del rows
        fd = os.open(partial, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, out)
        fsync_dir(out.parent)
        return
    step = max(1, COPY_CHUNK_BYTES // max(1, rows.shape[1] * 4))
    with atomic_path(out) as tmp:
        dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keep), rows.shape[1]))
        for s in range(0, len(keep), step):
            dst[s:s + step] = rows[keep[s:s + step]]
        dst.flush()
        del dst
    del rows
    partial.unlink(missing_ok=True)
