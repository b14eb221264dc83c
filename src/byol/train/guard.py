"""The non-finite guard: a diverging run stops before it can overwrite its last good checkpoint.

Every step folds "was this loss finite?" into a device tensor (no host sync). The loop reads it
where it syncs anyway: at each log row, and before every evaluation and checkpoint, where the
weights are checked too (a finite loss can still produce an infinite update). A bad reading
stops the run with ``TrainingDiverged``; no checkpoint is ever written from the bad state.

``train.nonfinite=skip`` instead drops a step whose gradients are not finite (no optimizer
step, no EMA update, as mixed-precision loss scalers do). That costs one host sync per step; a
run whose steps keep failing (``MAX_CONSECUTIVE_SKIPS`` in a row) stops as diverged all the same.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from byol import distributed

MAX_CONSECUTIVE_SKIPS = 20
_NONE = 2**62  # "no bad step yet": larger than any step, so the minimum over ranks finds the first


class TrainingDiverged(RuntimeError):
    """The loss or the weights became non-finite; ``str()`` is one line with the step, the last
    good checkpoint and what to change."""

    def __init__(self, message: str, *, result=None) -> None:
        super().__init__(message)
        self.result = result  # the PretrainResult (run_dir, step, diverged = {step, what, last_good_step})


class NonFiniteGuard:
    """Remembers the first step whose loss was not finite, on the device."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=device)
        self.consecutive_skips = 0
        self.last_good_step: int | None = None  # the step of the newest checkpoint written or loaded

    def observe(self, loss: torch.Tensor, step: int) -> None:
        """Fold in the loss of ``step`` (a device op, no sync)."""
        bad = ~torch.isfinite(loss.detach()) & (self.first_bad == _NONE)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def note_skip(self, skipped: bool) -> bool:
        """The skip policy's count; -> whether the run should now stop as diverged."""
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        return self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS

    def first_bad_step(self, weights: Iterable[torch.Tensor] | None = None) -> tuple[int, str] | None:
        """Read the flag (a host sync; collective under DDP: every rank must call it at the same
        step). -> (step, "loss" | "weights") of the first problem seen on any rank, or None.
        ``weights``: also check these tensors are all finite (reported at the current step)."""
        bad = self.first_bad.clone()
        weights_bad = torch.zeros((), dtype=torch.int64, device=bad.device)
        if weights is not None:
            flags = [~torch.isfinite(w.detach()).all() for w in weights if w.is_floating_point()]
            if flags:
                weights_bad = torch.stack(flags).any().to(torch.int64)
        if distributed.world_size() > 1:
            both = torch.stack([bad, -weights_bad])  # min over ranks of each: first bad, any bad
            torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MIN)
            bad, weights_bad = both[0], -both[1]
        step = int(bad)
        if step != _NONE:
            return step, "loss"
        if int(weights_bad):
            return -1, "weights"
        return None


def grads_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (one host sync). Under DDP the
    gradients are already averaged over ranks, so every rank reaches the same answer."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
