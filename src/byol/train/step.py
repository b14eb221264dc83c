"""One optimisation step of BYOL (docs/method.md §1, "Update order").

forward both views -> loss -> backward -> optimizer step (lr from the schedule) -> EMA of the
target (tau from the schedule) -> MoCo queue append. Stats stay on the device as tensors: reading
them (a host sync) is the logger's decision, every N steps, not the step's.

Gradient accumulation (``accumulate_steps=N`` > 1, optim.accumulate_steps): the batch [B, ...]
is split into N micro-batches [B/N, ...] along the batch dimension, in order; each one runs
forward and backward on its loss / N, so the summed gradients are the average over the
micro-batches, and the optimizer step, the EMA and the queue append happen once, after the last.
Under DDP only the last micro-batch's backward all-reduces (``no_sync`` on the others). What
is per micro-batch: the batch-norm statistics (and running-statistics updates), the InfoNCE
batch negatives. What is per step, as with N=1: the MoCo queue (every micro-batch reads the keys
of earlier steps; all micro-batches' keys are appended after the step, in the order of one
batch), the outputs the monitors read (y, z of the whole batch) and the stats (loss: the mean of
the micro-batches' losses; z_std: of the whole batch's z). N=1 is the plain step, bit for bit.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from byol.models.byol import BYOL, ForwardOutput, normalized_std
from byol.train.guard import grads_finite


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr into every group, times the group's ``lr_scale`` (the predictor's)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
    accumulate_steps: int = 1,
) -> StepResult:
    """One BYOL step on views [B,3,H,W] x2. ``model`` is a BYOL, possibly wrapped (DDP).

    -> StepResult(stats, outputs) (see ``BYOL.forward`` for the outputs the monitors read; y and
    z [B, *] of the whole batch under accumulation too).
    ``skip_nonfinite``: when a gradient is not finite, change nothing (no optimizer step, no EMA,
    no queue update) and set ``stats["skipped"]`` to 1.0 (0.0 otherwise); one host sync. Under
    accumulation the decision reads the accumulated gradients: a skip drops the whole step.
    ``accumulate_steps``: N micro-batches [B/N, 3, H, W] per step (the module docstring); B must
    be a multiple of N."""
    byol: BYOL = getattr(model, "module", model)
    set_lr(optimizer, lr)
    norm_stats = [b.clone() for b in _running_stats(byol)] if skip_nonfinite else None
    if accumulate_steps == 1:
        with autocast(v1.device, precision):
            out = model(v1, v2)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
    else:
        out = _accumulate(model, byol, optimizer, v1, v2, accumulate_steps, precision)
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


def _accumulate(model: torch.nn.Module, byol: BYOL, optimizer: torch.optim.Optimizer, v1: torch.Tensor,
                v2: torch.Tensor, n: int, precision: str) -> ForwardOutput:
    """Forward and backward of ``n`` micro-batches [B/n, 3, H, W] of the views [B, 3, H, W]: the
    gradients of the mean of their losses, all-reduced (DDP) on the last backward only.
    -> the whole batch's ForwardOutput (loss: the mean, detached; y, z [B, *]); the queue holds
    every micro-batch's keys, staged for ``update_queue``."""
    if v1.shape[0] % n:
        raise ValueError(f"train_step: batch {v1.shape[0]} is not a multiple of accumulate_steps={n}")
    optimizer.zero_grad(set_to_none=True)
    no_sync = getattr(model, "no_sync", None)  # DDP: skip the all-reduce until the last micro-batch
    outs, keys = [], []
    for i, (m1, m2) in enumerate(zip(v1.chunk(n), v2.chunk(n))):
        with no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext():
            with autocast(v1.device, precision):
                out = model(m1, m2)
            (out.loss / n).backward()
        outs.append(out.detach())
        keys.append(byol.staged_keys())
    if byol.queue is not None:  # per view, the micro-batches' keys in batch order: one batch's keys
        byol.queue.stage(*(torch.cat(k) for k in zip(*keys)))
    y, z = torch.cat([o.representation for o in outs]), torch.cat([o.projection for o in outs])
    stats = {k: torch.stack([o.stats[k] for o in outs]).mean() for k in outs[0].stats}
    if "z_std" in stats:
        stats["z_std"] = normalized_std(z)
    return ForwardOutput(stats["loss"], stats, y, z)
