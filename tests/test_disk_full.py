"""A full disk in any layer of a save: one line and exit code 4, never a traceback.

torch's zip writer answers a file object's ``OSError: [Errno 28]`` with its own
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...`` (the OSError is only
its context), safetensors' Rust writer with a ``SafetensorError`` that keeps "os error 28" in its
text. The run tests use real file systems: a tmpfs mounted for the test (where the test may
mount: as root), and a file-size limit (``RLIMIT_FSIZE``: the kernel refuses the write with
``EFBIG`` for any user, the same shape of fault as a full disk for every writer above it).
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from byol.files import refused_write
from byol.train.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from faults import byol_command, run_byol


def _zip_writer_error(e: OSError) -> RuntimeError:
    """What torch.save raises when its file object's write raised ``e``: its own RuntimeError,
    with the OSError as its context (as seen on a full tmpfs with torch 2.14)."""
    try:
        try:
            raise e
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 896 vs 790") from None
    except RuntimeError as r:
        r.__suppress_context__ = False  # torch raises it while handling the OSError
        r.__context__ = e
        return r


def test_a_full_dev_shm_is_named_as_such_not_as_the_run_directory():
    shm = RuntimeError("unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)")
    assert refused_write(shm).startswith("no space left in shared memory (/dev/shm)")
    assert "data.num_workers=0" in refused_write(shm)


def test_refused_write_reads_every_layer():
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert refused_write(enospc) == "no space left on device"
    assert refused_write(_zip_writer_error(enospc)) == "no space left on device"
    assert refused_write(OSError(errno.EDQUOT, "x")) == os.strerror(errno.EDQUOT).lower()
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert refused_write(rust) == "no space left on device"
    assert "cut short" in refused_write(OSError("1000000 requested and 131056 written"))
    zip_writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")
    assert "cut short" in refused_write(zip_writer)
    for other in (ValueError("bad value"), OSError(errno.EIO, "I/O error"), RuntimeError("shape mismatch")):
        assert refused_write(other) is None


def test_a_zip_writer_error_after_enospc_is_a_checkpoint_write_error(tmp_path, monkeypatch):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 1}, ckpt)
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # some bytes reached the file, then the disk filled
        raise _zip_writer_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, ckpt)
    assert "no space left on device" in str(info.value) and "last.pt is intact" in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt"]  # no temp file, nothing rotated
    assert load_checkpoint(ckpt / "last.pt")["step"] == 1

    def bug(obj, f, *a, **k):  # an error that is not the disk's still shows as itself
        raise RuntimeError("not a disk problem")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="not a disk problem"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 2}, ckpt)


def _assert_one_line_exit_4(done: subprocess.CompletedProcess, needle: str) -> str:
    assert done.returncode == 4, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("byol: error: ") and needle in last, last
    return last


def _limited(cmd: list[str], nbytes: int) -> tuple[list[str], object]:
    """``cmd`` under a file-size limit of ``nbytes`` (the kernel refuses a write past it with
    EFBIG; Python ignores SIGXFSZ): through util-linux's prlimit, else a preexec function."""
    if shutil.which("prlimit"):
        return ["prlimit", f"--fsize={nbytes}:{nbytes}", *cmd], None

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return cmd, limit


def test_a_file_size_limit_under_torchs_zip_writer_is_one_line_and_exit_4(tmp_path):
    """Any user: a checkpoint larger than the file-size limit fails inside torch's zip writer."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BYOL_DEBUG", None)
    # config.yaml, metrics.jsonl and the event file stay far below 256 KiB; a checkpoint is ~2 MB
    cmd, preexec = _limited([sys.executable, "-m", "byol", *byol_command(run)], 256 << 10)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)
    last = _assert_one_line_exit_4(done, "cannot write a checkpoint in ")
    assert "file too large" in last.lower() and "no earlier checkpoint exists" in last
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert json.loads((run / "summary.json").read_text())["finished"] is False


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (the file-size-limit test covers the same path for any user)"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs mounted at tmp_path/fs; ``resize(nbytes)`` remounts it with another size."""
    why = _can_mount()
    if why:
        pytest.skip(why)
    where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    where.mkdir()

    def mount(nbytes: int, remount: bool = False) -> None:
        opts = f"{'remount,' if remount else ''}size={nbytes}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True,
                       capture_output=True)

    mount(64 << 10)
    yield where, lambda nbytes: mount(nbytes, remount=True)
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_tmpfs_while_saving_is_one_line_exit_4_and_the_run_resumes(small_tmpfs, tmp_path):
    """A real full file system: room for two checkpoints and not three (last.pt + previous.pt +
    the new temp file), so the third save fails inside torch's zip writer."""
    fs, resize = small_tmpfs
    probe = tmp_path / "probe" / "run"  # the size of one checkpoint of this run
    sized = run_byol(byol_command(probe, "train.max_steps=2"), probe)
    assert sized.returncode == 0, sized.stderr
    ckpt_bytes = (probe / "checkpoints" / "last.pt").stat().st_size
    resize(int(2.5 * ckpt_bytes) + (256 << 10))
    run = fs / "run"
    full = run_byol(byol_command(run), run)
    last = _assert_one_line_exit_4(full, "cannot write a checkpoint in ")
    assert "no space left on device" in last and "last.pt is intact" in last
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    assert load_checkpoint(run / "checkpoints" / "previous.pt")["step"] == 2
    assert not list((run / "checkpoints").glob(".*.tmp"))
    resize(16 * ckpt_bytes)  # space freed
    done = run_byol(byol_command(run, resume=True), run)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 24


def test_an_export_to_a_full_tmpfs_is_one_line_and_exit_4(small_tmpfs, tmp_path):
    """Outside a run too: safetensors' writer on a full disk (not an OSError at all)."""
    fs, _ = small_tmpfs
    run = tmp_path / "run"
    made = run_byol(byol_command(run, "train.max_steps=2"), run)
    assert made.returncode == 0, made.stderr
    out = fs / "encoder.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "BYOL_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "byol", "export", str(run), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    _assert_one_line_exit_4(done, "no space left on device")
    assert not out.exists() and not [p for p in Path(fs).iterdir() if p.name.endswith(".tmp")]
