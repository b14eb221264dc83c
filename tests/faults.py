"""Real processes for the fault tests: `byol pretrain` in a child process, optionally with a
fault planted at an exact moment (a SIGKILL in the middle of a checkpoint write, a SIGKILL
between the two renames of a save, a full disk), or killed from outside at any moment."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

from conftest import TINY

# 48 images, batch 8: 6 steps per epoch, 4 epochs = 24 steps; a checkpoint every 2 steps.
RUN = [*TINY, "data.dataset=shapes", "data.shapes_size=48", "data.val_fraction=0",
       "optim.epochs=4", "train.checkpoint_every=2", "eval.final_knn=false"]
TOTAL_STEPS = 24

# Run inside the child before `byol` starts. FAULT (an env variable) is "<kind>:<n>": act on the
# n-th checkpoint write (1-based) of this process.
_PRELUDE = textwrap.dedent("""
    import errno, io, os, signal, sys
    import torch
    kind, n = os.environ["FAULT"].split(":")
    n = int(n)
    count = {"writes": 0, "renames": 0}
    real_save, real_replace = torch.save, os.replace

    def target(f):  # the path of the file object torch.save writes to
        try:
            return os.readlink(f"/proc/self/fd/{f.fileno()}")
        except (AttributeError, OSError, io.UnsupportedOperation):
            return ""

    def save(obj, f, *a, **k):
        if not target(f).startswith(os.path.join(os.environ["CKPT_DIR"], ".last.pt")):
            return real_save(obj, f, *a, **k)
        count["writes"] += 1
        if count["writes"] == n and kind in ("kill_in_write", "enospc"):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a checkpoint reaches the disk
            f.flush()
            os.fsync(f.fileno())
            if kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)

    def replace(src, dst, *a, **k):
        if str(dst).endswith(os.sep + "last.pt") and kind == "kill_between_renames":
            count["renames"] += 1
            if count["renames"] == n:  # last.pt is already previous.pt; the new one is still a temp file
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **k)

    torch.save, os.replace = save, replace
    from byol.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def byol_command(run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    if resume:
        return ["pretrain", "--resume", str(run_dir), *overrides]
    return ["pretrain", "--config", str(_empty_config(run_dir.parent)), *RUN,
            f"train.out_dir={run_dir.parent}", f"train.name={run_dir.name}", *overrides]


def _empty_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "base.yaml"
    path.write_text("train: {}\n")
    return path


def _env(run_dir: Path, fault: str | None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CKPT_DIR": str(run_dir.resolve() / "checkpoints")}
    env.pop("BYOL_DEBUG", None)
    if fault:
        env["FAULT"] = fault
    return env


def run_byol(args: list[str], run_dir: Path, fault: str | None = None, timeout: float = 300):
    """Run `byol ARGS` to its end in a child process -> CompletedProcess (rc -9 when killed)."""
    cmd = [sys.executable, "-c", _PRELUDE, *args] if fault else [sys.executable, "-m", "byol", *args]
    return subprocess.run(cmd, env=_env(run_dir, fault), capture_output=True, text=True, timeout=timeout)


def start_byol(args: list[str], run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "byol", *args], env=_env(run_dir, None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written
    return steps


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Block until the running child has logged ``step`` (it fails the test if the child ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in logged_steps(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"byol ended (rc {proc.returncode}) before step {step}: "
                                 f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"byol did not reach step {step} in {timeout}s")


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()


def checkpoint_model(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]
