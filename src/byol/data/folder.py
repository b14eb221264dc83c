"""A recursive folder of images as a dataset: labels from first-level subfolders, bad-file policy.

``scan_folder`` finds the images (sorted, deterministic); ``check_file`` is a cheap structural
check (magic bytes, header, end marker; no decode) meant to run over a million files;
``ImageFolderDataset`` combines them with a ``data.bad_files`` policy (skip or fail) and a pixel
limit (``data.max_pixels``) and yields uint8 ``[3, H, W]`` RGB tensors for the augmentation
pipelines.

What the scan does with what it finds (it never opens anything but folders, so it cannot block):

- regular files named like an image (``IMAGE_EXTENSIONS``, any case), directly or through a
  symbolic link: images, checked and decoded later;
- folders, also through symbolic links and also when named like an image (``cat.jpg/``): searched;
  a folder reached a second time (a link to a parent, a link cycle) is not searched again;
- entries named like an image that are not usable files: a broken symbolic link, a link loop, a
  named pipe, a socket or a device. They are not opened; they are listed as bad files with the
  reason (``FolderIndex.problems``), so ``data.bad_files=skip`` lists them among the skipped
  files and ``fail`` stops naming the first one;
- folders that cannot be listed (no permission, an I/O error): listed the same way, as
  ``unreadable folder: <why>``; ``data.path`` itself unreadable is an error;
- everything else is ignored: hidden files and folders (a leading dot), other extensions, and
  entries of other names that are not files or folders.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from byol.data.decode import check_file, decode_image
from byol.data.errors import DataError
from byol.data.headers import DEFAULT_MAX_PIXELS, not_regular_reason

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class FolderIndex:
    """The images under ``root`` in sorted relative-path order, with labels when labelled.

    ``labels[i]`` indexes ``classes`` (first-level subfolder names); ``labels`` is None and
    ``classes`` empty when some image lies directly in ``root``. ``problems`` holds ``(path,
    reason)`` of the entries the scan could not use (see the module docstring), sorted by path.
    """

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...]
    problems: tuple[tuple[str, str], ...] = ()


def _os_why(error: OSError) -> str:
    return error.strerror or str(error)


def _unusable_reason(entry: os.DirEntry) -> str:
    """Why an entry named like an image is neither a file nor a folder."""
    try:
        mode = entry.stat().st_mode  # follows a link
    except FileNotFoundError:
        return "broken symbolic link (its target does not exist)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"cannot read: {_os_why(e)}"
    return not_regular_reason(mode)


def _walk_images(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of all non-hidden image files under ``root`` (unsorted), and the
    ``(path, reason)`` of the entries it could not use (see the module docstring).

    ``os.scandir`` rather than ``Path.rglob``: several times faster on folders of millions of
    files. Symlinked folders are followed (datasets are often assembled from links), with a
    visited set of (device, inode) so a link cycle cannot loop forever; subfolders are searched
    in sorted order, so which of two links to one folder its images are found under does not
    depend on the order the file system lists them in.
    """
    found: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, str]] = [(str(root), "")]
    while stack:
        path, rel = stack.pop()
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            listing = os.scandir(path)
        except OSError as e:
            if not rel:
                raise DataError(f"data.path: cannot read folder {root}: {_os_why(e)}") from None
            problems.append((path, f"unreadable folder: {_os_why(e)}"))
            continue
        subfolders: list[tuple[str, str]] = []
        try:
            with listing as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    entry_rel = f"{rel}{entry.name}"
                    image_name = entry.name.lower().endswith(IMAGE_EXTENSIONS)
                    try:
                        if entry.is_dir():
                            subfolders.append((entry.path, entry_rel + "/"))
                            continue
                        if entry.is_file():
                            if image_name:
                                found.append(entry_rel)
                            continue
                    except OSError:  # a link loop, a stat refused: described below
                        pass
                    if image_name:
                        problems.append((entry.path, _unusable_reason(entry)))
        except OSError as e:  # the listing itself failed part way (an I/O error)
            problems.append((path, f"unreadable folder: {_os_why(e)}"))
        stack.extend(sorted(subfolders, reverse=True))  # popped in sorted order
    return found, problems


def scan_folder(root: str | os.PathLike) -> FolderIndex:
    """Index the images under ``root`` recursively (hidden files and folders ignored).

    Labelled when every image lies inside a first-level subfolder: the label is the index of
    that subfolder among the sorted first-level subfolders that hold images (deeper folders
    belong to their first-level folder). Raises DataError when ``root`` is missing, is a
    file, cannot be read or holds no images. Entries that cannot be used are not errors: they
    are returned in ``problems``.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.path: folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data.path: not a folder: {root}")
    found, problems = _walk_images(root)
    rel_paths = sorted(found)
    problems_sorted = tuple(sorted(problems))
    if not rel_paths:
        unusable = (f"; {len(problems)} could not be used, e.g. {problems_sorted[0][0]}: "
                    f"{problems_sorted[0][1]}" if problems else "")
        raise DataError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) found under "
                        f"{root}{unusable}")
    files = tuple(root / rel for rel in rel_paths)
    if any("/" not in rel for rel in rel_paths):
        return FolderIndex(root=root, files=files, labels=None, classes=(),
                           problems=problems_sorted)
    firsts = [rel.split("/", 1)[0] for rel in rel_paths]
    classes = tuple(sorted(set(firsts)))
    index = {name: k for k, name in enumerate(classes)}
    return FolderIndex(root=root, files=files, labels=tuple(index[f] for f in firsts),
                       classes=classes, problems=problems_sorted)


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


class ImageFolderDataset(torch.utils.data.Dataset):
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
    to each worker's copy of ``skipped``; they are not seen by the main process.
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
        self.skipped.append((str(path), reason))

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


def write_skipped(skipped: Sequence[tuple[str, str]], path: str | os.PathLike) -> None:
    """Write ``path<TAB>reason`` lines (one per skipped file) to ``path``, e.g. in a run dir."""
    with open(path, "w", encoding="utf-8") as f:
        for record in skipped:
            # A tab or newline inside a field would break the one-record-per-line format.
            file, reason = (" ".join(str(x).replace("\t", " ").splitlines()) for x in record)
            f.write(f"{file}\t{reason}\n")


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
