"""Checkpoint files that survive damage: verified content, a rotated previous copy, a fallback.

    checkpoints/last.pt        the newest training state
    checkpoints/previous.pt    the one before it (rotated, never deleted before last.pt exists)
    checkpoints/epoch_NNNN.pt  kept every train.keep_every_epochs (a copy of that last.pt)

A file is a plain ``torch.save`` of a dict of tensors and plain Python values, so
``torch.load(path, weights_only=True)`` reads it anywhere. Two additions make damage visible:

- **Integrity.** The dict carries ``integrity``: the sha256 of its own content (every tensor's
  dtype, shape and bytes, every plain value), computed before writing and checked after every
  load. torch's zip reader does not check its CRCs, so without this a flipped bit in a tensor
  would load silently; a truncated file already fails to open.
- **Atomic, durable writes.** The state goes to a temp file in the same folder, is fsynced,
  ``last.pt`` is renamed to ``previous.pt``, the temp file is renamed to ``last.pt`` and the
  folder is fsynced. A kill at any instant leaves at least one complete checkpoint; a full
  disk fails while writing the temp file, before anything is rotated.

Loading never runs code: ``weights_only=True`` refuses any pickled object other than tensors and
plain values, and the refusal is reported as such. ``load_newest`` tries the checkpoints of a run
from the highest step down and says which damaged ones it passed over.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from byol.data.errors import DataError
from byol.files import atomic_path, errno_of, refused_write

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
PREVIOUS = "previous.pt"
INTEGRITY = "integrity"
_DIGEST = "sha256-content-v1"  # names the walk in content_digest: change it with the walk
_TMP_PREFIX = "."  # temp files (byol.files.atomic_path): .last.pt.<random>.tmp
_EPOCH = re.compile(r"epoch_(\d+)\.pt$")
# Read errors that say the disk, the network or the machine refused, not that the file is bad.
_IO_ERRNOS = (errno.EIO, errno.ENOMEM, errno.ESTALE, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY,
              errno.ENOLCK, errno.ECONNRESET, errno.EHOSTDOWN)


class CheckpointUnreadable(DataError):
    """A checkpoint could not be read for a reason that says nothing about its content (an I/O
    error, no memory): never treated as damaged, never set aside."""


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, read-only, quota); the previous one is
    intact. ``str()`` is one line; ``errno`` the operating system's code."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


# --- content digest ------------------------------------------------------------------------

def content_digest(obj: Any) -> str:
    """sha256 over a checkpoint's content in a fixed walk: dict order, list/tuple structure,
    each tensor's dtype, shape and bytes, each plain value's type and repr."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(x, dict):
        h.update(f"D{len(x)}".encode())
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(x, (list, tuple)):
        h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)}".encode())
        for v in x:
            _feed(h, v)
    elif x is None or isinstance(x, (bool, int, float, str, bytes)):
        h.update(f"V{type(x).__name__}:{x!r};".encode())
    elif isinstance(x, np.ndarray):
        h.update(f"N{x.dtype}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    else:
        raise TypeError(f"checkpoint content of type {type(x).__name__} is not supported")


def seal(sd: dict[str, Any]) -> dict[str, Any]:
    """``sd`` plus its integrity record (the last key, so the loaded dict's order matches)."""
    body = {k: v for k, v in sd.items() if k != INTEGRITY}
    return {**body, INTEGRITY: {"algorithm": _DIGEST, "digest": content_digest(body)}}


def _verify(sd: Any, path: Path) -> dict[str, Any]:
    if not isinstance(sd, dict) or "model" not in sd or "step" not in sd:
        raise DataError(f"{path} is not a byol checkpoint")
    record = sd.pop(INTEGRITY, None)
    if record is None:  # written before checkpoints were sealed: loadable, not verifiable
        return sd
    if not isinstance(record, dict) or record.get("algorithm") != _DIGEST:
        raise DataError(f"{path}: unknown integrity record {record!r}; upgrade byol")
    if content_digest(sd) != record.get("digest"):
        raise DataError(f"{path} is damaged: its content does not match its integrity digest "
                        "(a flipped bit, a bad copy or a dying disk)")
    return sd


# --- loading -------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """Load and verify a checkpoint; DataError (one line) when missing, damaged or unsafe.
    ``data``: the file's bytes, already read by the caller (parsed instead of reading again)."""
    path = Path(path)
    try:
        sd = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu",
                        weights_only=True)
    except FileNotFoundError:
        raise DataError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a checkpoint file") from None
    except OSError as e:
        if isinstance(e, PermissionError) or e.errno in _IO_ERRNOS:  # the file may be fine
            raise CheckpointUnreadable(f"cannot read {path}: {e.strerror or e}") from None
        raise DataError(f"{path} is not a byol checkpoint (or is truncated or damaged)") from None
    except MemoryError:
        raise CheckpointUnreadable(f"not enough memory to load {path}") from None
    except pickle.UnpicklingError as e:  # weights_only refused a global: never retry unsafely
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise DataError(f"{path} refused: it holds pickled Python objects, not only tensors "
                            "(loading it could run code); byol loads weights only") from None
        raise DataError(f"{path} is not a byol checkpoint (or is damaged)") from None
    except Exception:  # truncated, corrupt or not a torch file at all
        raise DataError(f"{path} is not a byol checkpoint (or is truncated or damaged)") from None
    return _verify(sd, path)


def candidates(ckpt_dir: Path) -> list[Path]:
    """The checkpoint files of a run: last.pt, previous.pt, epoch_NNNN.pt (those that exist)."""
    names = [LAST, PREVIOUS, *sorted((p.name for p in ckpt_dir.glob("epoch_*.pt") if _EPOCH.match(p.name)),
                                     reverse=True)]
    return [ckpt_dir / n for n in names if (ckpt_dir / n).is_file()]


def _peek_step(path: Path) -> int:
    """The step a checkpoint holds, reading only its small pickle (-1 when unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return -1


class Loaded(NamedTuple):
    path: Path
    state: dict[str, Any]
    passed_over: list[tuple[Path, str]]  # damaged checkpoints tried first, with the reason


def load_newest(run_dir: str | Path) -> Loaded:
    """The checkpoint of ``run_dir`` with the highest step that loads and verifies (last.pt on a
    tie). ``passed_over`` lists the damaged ones met on the way, and those too damaged to tell
    their step. DataError listing every reason when none loads."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    files = candidates(ckpt_dir) if ckpt_dir.is_dir() else []
    if not files:
        raise DataError(f"no checkpoint in {run_dir} (expected {ckpt_dir / LAST})")
    steps = {p: _peek_step(p) for p in files}
    passed: list[tuple[Path, str]] = []
    for path in (p for p in files if steps[p] < 0):  # not even its step is readable: damaged
        try:
            load_checkpoint(path)
        except CheckpointUnreadable:
            raise
        except DataError as e:
            passed.append((path, str(e)))
    for path in sorted((p for p in files if steps[p] >= 0), key=lambda p: (-steps[p], files.index(p))):
        try:
            return Loaded(path, load_checkpoint(path), passed)
        except CheckpointUnreadable:
            raise  # falling back past an intact file would silently lose its steps
        except DataError as e:
            passed.append((path, str(e)))
    reasons = "; ".join(reason for _, reason in passed)
    raise DataError(f"no checkpoint of {run_dir} loads: {reasons}")


def find_checkpoint(run_or_file: str | Path) -> Path:
    """A checkpoint file, or a run directory -> its newest checkpoint file (last.pt, or the
    rotated previous.pt when a kill fell between the two renames). One-line error if none."""
    p = Path(run_or_file)
    if p.is_file():
        return p
    if not p.exists():
        raise DataError(f"no such run directory or checkpoint: {p}")
    files = candidates(p / CHECKPOINT_DIR) if (p / CHECKPOINT_DIR).is_dir() else []
    if not files:
        raise DataError(f"no checkpoint in {p} (expected {p / CHECKPOINT_DIR / LAST})")
    return files[0]


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to ``<name>.damaged`` (kept for inspection, never rotated
    over a good copy)."""
    aside, n = path.with_name(path.name + ".damaged"), 1
    while aside.exists():  # an earlier damaged copy stays too
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, aside)
    return aside


def remove_stale_temp_files(ckpt_dir: Path) -> list[Path]:
    """Delete temp files left by a write that was killed (call only while holding the run lock)."""
    stale = [p for p in ckpt_dir.glob(f"{_TMP_PREFIX}*.tmp") if p.is_file()] if ckpt_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# --- writing -------------------------------------------------------------------------------

def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically and durably (``byol.files.atomic_path``; single
    files: no rotation, no seal)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def _copy(src: Path, dst: Path) -> None:
    """A durable, atomic copy (not a hard link: a later in-place write to one name, e.g.
    ``cp x last.pt``, must not change the other)."""
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def save_checkpoint(sd: dict[str, Any], ckpt_dir: str | Path, *, keep_as: str | None = None) -> Path:
    """Seal ``sd`` and make it ``ckpt_dir/last.pt``, the old last.pt becoming previous.pt.
    ``keep_as``: also keep a copy of this state as ``ckpt_dir/keep_as``. CheckpointWriteError
    (one line) when the disk refuses the write; then last.pt and previous.pt are as they were."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST
    sealed = seal(sd)
    rotating = False

    def rotate() -> None:  # the new state is complete and fsynced: only now may last.pt move
        nonlocal rotating
        rotating = True
        if last.exists():
            os.replace(last, ckpt_dir / PREVIOUS)

    try:  # the temp file is .last.pt.<random>.tmp, as tests/faults.py expects
        with atomic_path(last, before_replace=rotate) as tmp, open(tmp, "wb") as f:
            torch.save(sealed, f)
    except Exception as e:  # torch's zip writer raises its own RuntimeError after the OSError
        why = _refusal(e)
        if rotating or why is None:  # a rename failed, not the write, or not the disk at all
            raise
        kept = f"{last} is intact" if last.exists() else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"cannot write a checkpoint in {ckpt_dir}: {why}; {kept}",
                                   errno_of(e)) from e
    if keep_as is not None:
        kept = ckpt_dir / keep_as
        try:
            _copy(last, kept)
        except Exception as e:
            why = _refusal(e)
            if why is None:
                raise
            raise CheckpointWriteError(f"cannot keep {kept}: {why}; {last} is intact", errno_of(e)) from e
    return last


def _refusal(e: BaseException) -> str | None:
    """Why a checkpoint write failed, when the storage refused it (``byol.files.refused_write``);
    any other OSError of the write too (a vanished folder, an I/O error): the previous checkpoint
    is intact all the same, and the run must stop with the one line."""
    why = refused_write(e)
    if why is None and isinstance(e, OSError):
        why = e.strerror or str(e)
    return why


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Keep a copy of checkpoint ``src`` as ``dst`` (e.g. an epoch's, redone after a kill)."""
    _copy(src, dst)
