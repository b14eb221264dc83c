"""A recursive folder of images as a dataset: labels from first-level subfolders, bad-file policy.

``scan_folder`` finds the images (sorted, deterministic); ``check_file`` is a cheap structural
check (magic bytes, header, end marker; no decode) meant to run over a million files;
``ImageFolderDataset`` combines them with a ``data.bad_files`` policy (skip or fail) and a pixel
limit (``data.max_pixels``) and yields uint8 ``[3, H, W]`` RGB tensors for the augmentation
pipelines.

The scan itself (what it does with links, pipes, unreadable folders) is ``byol.data.scan``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from byol.data.decode import check_file, decode_image
from byol.data.errors import DataError
from byol.data.headers import DEFAULT_MAX_PIXELS
from byol.data.scan import scan_folder
from byol.data.skips import SkipRecords


def _validate_args(bad_files: str, verify: str, limit: int | None,
                   max_pixels: int | None) -> None:
    if bad_files not in ("skip", "fail"):
        raise ValueError(f"data.bad_files must be 'skip' or 'fail', got {bad_files!r}")
    if verify not in ("quick", "full"):
        raise ValueError(f"data.verify must be 'quick' or 'full', got {verify!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"data.limit must be a positive integer or None, got {limit!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels <= 0):
        raise ValueError(f"data.max_pixels must be a positive integer or None, got {max_pixels!r}")


def _limit_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``limit`` of ``range(n)``, in sorted order.

    Random rather than the first ``limit``: files are sorted by class folder, so a prefix would
    hold only the first class or two.
    """
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).permutation(n)[:limit].tolist())


def _full_check(path: Path, max_pixels: int | None) -> str | None:
    """verify="full": the reason a full decode fails, or None."""
    try:
        decode_image(path, max_pixels)
    except DataError as e:
        return _decode_reason(e, path)
    return None


def _decode_reason(error: DataError, path: Path) -> str:
    """The decoder's reason without decode_image's path prefix (callers name the file)."""
    return str(error).removeprefix(f"cannot decode image {path}: ")


class ImageFolderDataset(SkipRecords, torch.utils.data.Dataset):
    """Images of a folder (see ``scan_folder``) as ``(sample, label)`` pairs.

    ``sample`` is ``transform(uint8 [3, H, W])`` (the raw uint8 tensor without a transform);
    ``label`` is an int, -1 when the folder is unlabelled. ``limit`` keeps a seeded random
    subset before checking, so fewer than ``limit`` files remain if some are bad. ``classes``
    always lists every class of the folder, so labels agree with an unlimited scan.

    Bad files: ``verify="quick"`` runs ``check_file`` on every kept file, ``"full"`` decodes
    each one; both refuse an image of more than ``max_pixels`` pixels (None: no limit) from its
    header, before decoding it. The entries the scan could not use (``FolderIndex.problems``:
    broken links, named pipes, unreadable folders, ...) count as bad files too, whatever
    ``limit``. ``bad_files="skip"`` drops them and records ``(path, reason)`` in ``skipped``;
    ``"fail"`` raises DataError naming the first one. A file that passes the quick check but
    fails to decode in ``__getitem__`` is handled the same way at load time (skip: the next
    decodable index is returned instead). Inside DataLoader workers these load-time entries go
    to each worker's copy of ``skipped``; after ``share_skips`` they reach the main process's
    ``collect_skipped`` (``byol.data.skips``).
    """

    def __init__(self, root: str | os.PathLike, *, bad_files: str = "skip",
                 verify: str = "quick", limit: int | None = None, seed: int = 0,
                 transform: Callable[[torch.Tensor], object] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        _validate_args(bad_files, verify, limit, max_pixels)
        index = scan_folder(root)
        self.root = index.root
        self.classes: list[str] = list(index.classes)
        self.bad_files = bad_files
        self.transform = transform
        self.max_pixels = max_pixels
        self.skipped: list[tuple[str, str]] = []
        self._bad_at_load: set[int] = set()
        for path, reason in index.problems:
            self._record_bad(Path(path), reason)
        check = check_file if verify == "quick" else _full_check
        files: list[Path] = []
        labels: list[int] = []
        for i in _limit_indices(len(index.files), limit, seed):
            path = index.files[i]
            reason = check(path, max_pixels)
            if reason is not None:
                self._record_bad(path, reason)
                continue
            files.append(path)
            labels.append(index.labels[i] if index.labels is not None else -1)
        if not files:
            raise DataError(f"data.path: no usable images under {self.root}: all "
                            f"{len(self.skipped)} files were skipped as bad")
        self.files: list[Path] = files
        self.labels: list[int] | None = labels if index.labels is not None else None

    def _record_bad(self, path: Path, reason: str) -> None:
        if self.bad_files == "fail":
            raise DataError(f"bad image file {path}: {reason} "
                            "(set data.bad_files=skip to skip such files)")
        self._note_skip(str(path), reason)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[object, int]:
        n = len(self.files)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        # Deterministic fallback: walk forward from i to the next file that decodes.
        for j in (i + k for k in range(n)):
            j %= n
            if j in self._bad_at_load:
                continue
            try:
                img = decode_image(self.files[j], self.max_pixels)
            except DataError as e:
                self._bad_at_load.add(j)
                self._record_bad(self.files[j], _decode_reason(e, self.files[j]))
                continue
            label = self.labels[j] if self.labels is not None else -1
            return (self.transform(img) if self.transform is not None else img), label
        raise DataError(f"data.path: no image under {self.root} could be decoded")


def split_per_class(labels: Sequence[int], fraction: float,
                    seed: int) -> tuple[list[int], list[int]]:
    """A fixed, class-stratified held-out split of indices ``0..len(labels)-1``.

    Per class, a seeded shuffle of its indices; the first ``round(fraction * n_class)`` are
    held out, clamped to [1, n_class - 1] for classes of >= 2 items (every class is evaluated
    and keeps at least one training example) and 0 for singleton classes. Each class has its
    own generator ``default_rng([seed, class])`` so a class's split does not depend on which
    other classes exist. Returns sorted, disjoint ``(train_indices, heldout_indices)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction!r}")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if fraction == 0.0:
        return list(range(len(labels_arr))), []
    heldout: list[int] = []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        n = len(idx)
        k = 0 if n < 2 else min(max(round(fraction * n), 1), n - 1)
        # Class labels may be -1 (unlabelled); offset keeps the rng seed non-negative.
        rng = np.random.default_rng([seed, int(c) + 1])
        heldout.extend(rng.permutation(idx)[:k].tolist())
    held = set(heldout)
    train = [i for i in range(len(labels_arr)) if i not in held]
    return train, sorted(heldout)
