"""Schedules as pure functions of the step (docs/method.md §1 and §4).

Each function maps ``(step, total_steps, ...)`` to a float and keeps no state, so a resumed run
needs only the step to get the same values back, and each can be tested at its known points.
"""
from __future__ import annotations

import math


def _check_steps(step: int, total_steps: int) -> None:
    if total_steps <= 0:
        raise ValueError(f"schedule: total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"schedule: step must be >= 0, got {step}")


def _check_tau(tau_base: float) -> None:
    if not 0.0 <= tau_base <= 1.0:
        raise ValueError(f"schedule: tau_base must be in [0, 1], got {tau_base}")


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of docs/method.md §4: ``base_lr * batch_size / 256``."""
    if batch_size <= 0:
        raise ValueError(f"scaled_lr: batch_size must be > 0, got {batch_size}")
    if base_lr < 0:
        raise ValueError(f"scaled_lr: base_lr must be >= 0, got {base_lr}")
    return base_lr * batch_size / 256


def warmup_cosine_lr(
    step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0
) -> float:
    """Learning rate of docs/method.md §4: linear warm-up, then cosine decay.

    Rises linearly from 0 at step 0 to ``peak_lr`` at ``step == warmup_steps``, then follows a
    half cosine down to ``final_lr`` at ``step == total_steps`` and stays there beyond.
    ``warmup_steps == 0`` gives a pure cosine from ``peak_lr``. When ``warmup_steps ==
    total_steps`` the cosine part has no length and the end value ``final_lr`` wins at the end.
    """
    _check_steps(step, total_steps)
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_cosine_lr: warmup_steps must be in [0, total_steps={total_steps}], "
                         f"got {warmup_steps}")
    if step >= total_steps:
        return final_lr
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_tau(step: int, total_steps: int, tau_base: float) -> float:
    """EMA rate of the target (docs/method.md §1): ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``.

    ``tau_base`` at step 0, ``(1 + tau_base) / 2`` halfway, 1.0 at ``total_steps`` and beyond.
    """
    _check_steps(step, total_steps)
    _check_tau(tau_base)
    k = min(step, total_steps)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def constant_tau(step: int, total_steps: int, tau_base: float) -> float:
    """A fixed EMA rate ``tau_base`` at every step, for the τ ablations of docs/method.md §7."""
    _check_steps(step, total_steps)
    _check_tau(tau_base)
    return tau_base
