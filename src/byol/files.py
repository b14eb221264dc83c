"""Atomic file writes: a file appears under its name complete, or not at all.

    with atomic_path(run_dir / "summary.json") as tmp:   # a fresh empty file beside the target
        tmp.write_text(text)                               # by name, or open(tmp, "wb") for a file
    # the target now holds the new content, durably

Every writer of the package that replaces a file goes through ``atomic_path``: the content goes
to a temp file in the target's folder, which is fsynced and renamed over the target
(``os.replace``: atomic on POSIX), then the folder is fsynced so the rename survives a power
cut. A kill at any instant leaves the old file or the new one, never half of either. On any
failure (in the block or in those steps) the temp file is removed and the target is as it was.

Temp files are named ``<prefix><random>.tmp`` (prefix ``.<name>.`` by default, e.g.
``.last.pt.3f9a0c1d.tmp``): hidden, next to what they replace, and recognisable as leftovers
of a killed write by the ``.tmp`` suffix. They are created like any new file (mode 0o666 less
the umask), so the target gets the permissions a plain ``open(path, "w")`` would give it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# The storage refused the data: full, over quota, read-only, or a file over the file system's limit.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
# The same refusal as a layer under Python reports it without an errno: safetensors' Rust writer
# ("... (os error 28)"), numpy's short write ("N requested and M written"), torch's zip writer
# ("[enforce fail at inline_container.cc] unexpected pos ..." or "file write failed"), which it
# raises after the file object's OSError, so the OSError may only be its context.
_REFUSAL_TEXT = re.compile(r"os error (?:28|122|30|27)\b|no space left on device|disk quota exceeded|"
                           r"read-only file system|file too large|requested and \d+ written|"
                           r"inline_container\.cc.*unexpected pos|file write failed", re.IGNORECASE)


def exception_chain(exc: BaseException | None):
    """``exc`` and the exceptions it was raised from or while handling (as a traceback shows them)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else (
            None if exc.__suppress_context__ else exc.__context__)


SHARED_MEMORY = "no space left in shared memory"
_SHM_TEXT = re.compile(r"shared memory|/dev/shm", re.IGNORECASE)


def first_oserror(exc: BaseException | None) -> OSError | None:
    """The first OSError in ``exc``'s chain (its errno and file name), if any."""
    return next((e for e in exception_chain(exc) if isinstance(e, OSError)), None)


def errno_of(exc: BaseException | None) -> int | None:
    """The operating system's code of the first OSError in ``exc``'s chain, if any."""
    os_error = first_oserror(exc)
    return os_error.errno if os_error is not None else None


def refused_write(exc: BaseException) -> str | None:
    """Why the storage refused a write, when ``exc`` says so in whatever layer raised it (an
    OSError with a disk errno, also as the context of torch's zip-writer error, or the text of a
    writer that keeps no errno); None for any other error. Lower case, e.g. "no space left on device".
    A DataLoader worker that found /dev/shm full is named as such: the run's disk is not full."""
    if any(_SHM_TEXT.search(str(e)) for e in exception_chain(exc)):
        return (f"{SHARED_MEMORY} (/dev/shm) for the loader workers: set data.num_workers=0, or give "
                "the container more (docker run --shm-size)")
    for e in exception_chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return os.strerror(e.errno).lower()
    for e in exception_chain(exc):
        text = str(e)
        if _REFUSAL_TEXT.search(text):
            if re.search(r"os error 28\b|no space left", text, re.IGNORECASE):
                return os.strerror(errno.ENOSPC).lower()
            return "the write was cut short (a full disk or a file system limit)"
    return None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # writable: fsync needs it on some systems
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp(folder: Path, prefix: str) -> Path:
    """A new empty file ``folder/<prefix><random>.tmp`` that did not exist before."""
    while True:
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, prefix: str | None = None,
                before_replace: Callable[[], object] | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path`` (its folder is created) for the block to write; when the
    block ends normally, fsync the temp file, call ``before_replace`` (if given: the new content
    is then complete on disk, e.g. the moment to rotate the old file away), rename the temp file
    over ``path`` and fsync the folder. Any exception removes the temp file and propagates.

    ``prefix``: the temp file's name before its random part; default ``.<name of path>.``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path.parent, f".{path.name}." if prefix is None else prefix)
    try:
        yield tmp
        _fsync_file(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` by ``text`` atomically and durably (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
