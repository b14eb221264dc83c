"""Where and how a run executes: the device, the precision, and the stop flag that turns
SIGINT/SIGTERM (Ctrl-C, a preemption) into "finish this step, checkpoint, exit"."""
from __future__ import annotations

import signal

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


def resolve_precision(name: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if name == "auto" else name


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
