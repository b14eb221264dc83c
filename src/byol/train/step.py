"""One optimisation step of BYOL (DESIGN.md "Data flow of one step").

forward both views -> loss -> backward -> optimizer step (lr from the schedule) -> EMA of the
target (tau from the schedule). Stats stay on the device as tensors: reading them (a host sync)
is the logger's decision, every N steps, not the step's.
"""
from __future__ import annotations

import contextlib

import torch

from byol.models.byol import BYOL


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
):
    """One BYOL step on views [B,3,H,W] x2. ``model`` is a BYOL, possibly wrapped (DDP).

    -> stats (scalar device tensors), or (stats, outputs) with ``return_outputs``: the detached
    representation and projection of the first view (see BYOL.forward) for the monitors."""
    byol: BYOL = getattr(model, "module", model)
    set_lr(optimizer, lr)
    with autocast(v1.device, precision):
        loss, stats, outputs = model(v1, v2, return_outputs=True)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    byol.update_target(tau)  # after the online step (PAPER.md §1)
    byol.update_queue(outputs)  # MoCo: this step's keys become negatives of the next steps
    return (stats, outputs) if return_outputs else stats
