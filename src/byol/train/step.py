"""One optimisation step of BYOL (docs/method.md §1, "Update order").

forward both views -> loss -> backward -> optimizer step (lr from the schedule) -> EMA of the
target (tau from the schedule) -> MoCo queue append. Stats stay on the device as tensors: reading
them (a host sync) is the logger's decision, every N steps, not the step's.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from byol.models.byol import BYOL, ForwardOutput
from byol.train.guard import grads_finite


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _running_stats(model: torch.nn.Module) -> list[torch.Tensor]:
    """The buffers a training-mode forward changes: the batch norms' running statistics."""
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


def autocast(device: torch.device, precision: str):
    """bf16 autocast context for precision "bf16"; a no-op context for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StepResult(NamedTuple):
    """What ``train_step`` gives back: ``stats, outputs = train_step(...)``."""

    stats: dict[str, torch.Tensor]  # scalar device tensors: loss, z_std (+ skipped)
    outputs: ForwardOutput  # the forward's outputs, all detached: y and z of view 1 for the monitors


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    lr: float,
    tau: float,
    precision: str = "fp32",
    skip_nonfinite: bool = False,
) -> StepResult:
    """One BYOL step on views [B,3,H,W] x2. ``model`` is a BYOL, possibly wrapped (DDP).

    -> StepResult(stats, outputs) (see ``BYOL.forward`` for the outputs the monitors read).
    ``skip_nonfinite``: when a gradient is not finite, change nothing (no optimizer step, no EMA,
    no queue update) and set ``stats["skipped"]`` to 1.0 (0.0 otherwise); one host sync."""
    byol: BYOL = getattr(model, "module", model)
    set_lr(optimizer, lr)
    norm_stats = [b.clone() for b in _running_stats(byol)] if skip_nonfinite else None
    with autocast(v1.device, precision):
        out = model(v1, v2)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    stats = out.stats
    if skip_nonfinite:
        finite = grads_finite(optimizer)
        stats["skipped"] = out.loss.new_tensor(0.0 if finite else 1.0, dtype=torch.float32)
        if not finite:  # undo the forward's running-statistics update too: the step never happened
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(_running_stats(byol), norm_stats):
                    b.copy_(saved)
            return StepResult(stats, out.detach())  # no queue append: the next forward restages
    optimizer.step()
    byol.update_target(tau)  # after the online step (docs/method.md §1)
    byol.update_queue()  # MoCo: this step's keys become negatives of the next steps
    return StepResult(stats, out.detach())
