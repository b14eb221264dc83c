"""Where and how a run executes, decided once: the device (joining the torchrun group), the
precision, the memory format, the loader workers, the process-wide CPU settings; and the stop
flag that turns SIGINT/SIGTERM (Ctrl-C, a preemption) into "finish this step, checkpoint, exit".

    rt = start_runtime(cfg, default_workers)   # Runtime(device, precision, memory_format, workers, rank, world)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

import torch

from byol import distributed
from byol.data.pipeline import memory_format_of


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> torch.device; ValueError naming ``what`` otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{what}={name} but CUDA is not available on this machine")
    return torch.device(name)


# The instruction-set caps a user (or a container) can set for the libraries torch computes with,
# and the values under which bf16 is still native: oneDNN's convolutions and matmuls (its ISA names;
# bf16 dot products from AVX512_CORE_BF16 on), ATen's own vectorised kernels, MKL's matmuls.
_ISA_CAPS = {
    "ONEDNN_MAX_CPU_ISA": ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
                           "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT"),
    "ATEN_CPU_CAPABILITY": ("avx512", "avx512_bf16", "avx512_vnni", "default"),
    "MKL_ENABLE_INSTRUCTIONS": ("AVX512_E2", "AVX512_E3", "AVX512_E4", "AVX512_E5"),
}
_ISA_CAPS["DNNL_MAX_CPU_ISA"] = _ISA_CAPS["ONEDNN_MAX_CPU_ISA"]  # oneDNN's older name


def isa_cap_without_bf16(environ=None) -> str | None:
    """The environment setting (``NAME=VALUE``) that caps the instruction set below native bf16,
    e.g. ``ONEDNN_MAX_CPU_ISA=AVX2``; None when nothing does. ``ATEN_CPU_CAPABILITY=default``
    means "no cap" to ATen, so it does not count."""
    env = os.environ if environ is None else environ
    for name, native in _ISA_CAPS.items():
        value = env.get(name, "").strip()
        if value and value.upper() not in {v.upper() for v in native}:
            return f"{name}={value}"
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and no environment setting
    caps the instruction set below it (``isa_cap_without_bf16``): oneDNN's bf16 kernels are then
    faster than fp32 (measured 1.8x for the ResNet-18 step, docs/benchmarks.md); without it bf16
    is emulated and slower, so ``auto`` keeps fp32."""
    if isa_cap_without_bf16() is not None:
        return False
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


@dataclass(frozen=True)
class Runtime:
    """What every part of a run needs to know about where it runs."""

    device: torch.device
    precision: str  # "bf16" (autocast) or "fp32"
    memory_format: torch.memory_format  # of the images and the convolutions
    workers: int  # DataLoader worker processes
    rank: int = 0
    world: int = 1  # processes (torchrun); the global batch is split over them

    @property
    def main(self) -> bool:
        return self.rank == 0


def apply_runtime(cfg, device: torch.device) -> str:
    """The process-wide settings of ``cfg.train`` for ``device`` (allocator, threads) -> precision."""
    if device.type == "cpu" and cfg.train.malloc_tuning:
        tune_cpu_allocator()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return resolve_precision(cfg.train.precision, device)


def start_runtime(cfg, workers_for) -> Runtime:
    """Resolve ``cfg.train``'s device (one process per device under torchrun), check the global
    batch splits over the processes, apply the process-wide settings. ``workers_for(requested,
    device)``: the loader's worker policy."""
    device = resolve_device(cfg.train.device)
    distributed.init_from_env(device.type)  # torchrun: join the group, one process per device
    world = distributed.world_size()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
    if not isinstance(cfg.optim.batch_size, str) and cfg.optim.batch_size % world:  # auto: chosen later
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} must be a multiple of the "
                         f"{world} processes (it is the global batch)")
    precision = apply_runtime(cfg, device)
    return Runtime(device, precision, memory_format_of(cfg), workers_for(cfg.data.num_workers, device),
                   distributed.rank(), world)

