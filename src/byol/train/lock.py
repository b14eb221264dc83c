"""One run, one writer: an exclusive lock on a run directory while a process trains in it.

    with RunLock(run_dir):     # DataError (one line) when another process holds it
        ... train, checkpoint, log ...

The lock is a POSIX record lock (``fcntl.lockf``) on ``run_dir/.lock``. The kernel drops it when
its process ends, however it ends (SIGKILL, OOM, power loss of a local disk), so a killed run
never leaves it stuck; and unlike ``flock`` it is not inherited by forked DataLoader workers,
which may outlive a killed parent by a few seconds. The file itself stays behind and only
names the last holder (pid, host) for the message.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from byol.data.errors import DataError

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None


class RunLock:
    """Exclusive while held; a second process gets a DataError naming the holder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise DataError(f"{self.path.parent} is in use by another byol process ({holder}); "
                                "wait for it to finish or stop it, then resume") from None
            raise DataError(f"cannot lock {self.path}: {e.strerror or e} (a file system without "
                            "POSIX locks? put the run on a local disk)") from None
        try:  # who holds it, for the message a second process gets; best effort
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        except OSError:
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
