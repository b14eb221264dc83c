"""Where and how a run executes: the device, the precision, the CPU allocator, and the stop
flag that turns SIGINT/SIGTERM (Ctrl-C, a preemption) into "finish this step, checkpoint, exit"."""
from __future__ import annotations

import ctypes
import signal
import sys

import torch


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> torch.device; ValueError naming ``what`` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{what}={name} but CUDA is not available on this machine")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): oneDNN's bf16 kernels are
    then faster than fp32 (measured 1.8x for the ResNet-18 step, docs/benchmarks.md); without
    it bf16 is emulated and slower, so ``auto`` keeps fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    try:
        return torch.backends.mkldnn.is_available() and any(bool(c()) for c in checks if c is not None)
    except RuntimeError:  # a build without these probes
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """"auto" -> bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process heap (glibc only): no mmap/munmap per large tensor,
    no trimming. A CPU training step allocates and frees the same activation sizes every step;
    by default glibc serves each one with fresh zeroed pages from the kernel. Measured +9% images/s
    for the fp32 ResNet-18 step at batch 128 (docs/benchmarks.md). Returns False where it does
    not apply (not Linux/glibc). Process-wide; ``train.malloc_tuning=false`` leaves it off."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends: nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
                and mallopt(_M_TOP_PAD, 64 << 20))


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and returns."""

    def __init__(self) -> None:
        self.set = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, no early stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
