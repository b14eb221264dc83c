"""One optimisation step of BYOL (DESIGN.md "Data flow of one step").

forward both views -> loss -> backward -> optimizer step (lr from the schedule) -> EMA of the
target (tau from the schedule). Stats stay on the device as tensors: reading them (a host sync)
is the logger's decision, every N steps, not the step's.
"""
from __future__ import annotations

import contextlib

import torch

from byol.models.byol import BYOL
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


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    lr: float,
    tau: float,
    precision: str = "fp32",
    return_outputs: bool = False,
    skip_nonfinite: bool = False,
):
    """One BYOL step on views [B,3,H,W] x2. ``model`` is a BYOL, possibly wrapped (DDP).

    -> stats (scalar device tensors), or (stats, outputs) with ``return_outputs``: the detached
    representation and projection of the first view (see BYOL.forward) for the monitors.
    ``skip_nonfinite``: when a gradient is not finite, change nothing (no optimizer step, no EMA,
    no queue update) and set ``stats["skipped"]`` to 1.0 (0.0 otherwise); one host sync."""
    byol: BYOL = getattr(model, "module", model)
    set_lr(optimizer, lr)
    norm_stats = [b.clone() for b in _running_stats(byol)] if skip_nonfinite else None
    with autocast(v1.device, precision):
        loss, stats, outputs = model(v1, v2, return_outputs=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if skip_nonfinite:
        finite = grads_finite(optimizer)
        stats["skipped"] = loss.new_tensor(0.0 if finite else 1.0, dtype=torch.float32)
        if not finite:  # undo the forward's running-statistics update too: the step never happened
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(_running_stats(byol), norm_stats):
                    b.copy_(saved)
            return (stats, outputs) if return_outputs else stats
    optimizer.step()
    byol.update_target(tau)  # after the online step (PAPER.md §1)
    byol.update_queue(outputs)  # MoCo: this step's keys become negatives of the next steps
    return (stats, outputs) if return_outputs else stats
