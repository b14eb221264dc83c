"""A time budget for a run (``train.budget=10m``): measure the step rate, then fix the total steps.

    seconds = parse_budget("1h30m")            # 5400.0; ConfigError for "10 minutes", "-5m", "0s"
    meter = BudgetMeter(seconds, start_step=state.step)
    meter.after_step(step, elapsed_s)          # -> the total once fixed (else None)

The rule (docs/method.md §4 for the schedules laid over the total):

- Measuring window: the first ``WARMUP_STEPS`` steps of a session warm the kernels (not timed),
  the next ones are timed on the run's training clock (``state.elapsed_s``: data, steps and
  checkpoints; evaluations are paused out of it): at least ``MEASURE_STEPS`` steps and at least
  ``MEASURE_FRACTION`` of the budget, so that a few slow seconds at the start (another process
  busy for a moment) do not size the whole run. Past ``MEASURE_STEPS`` the window is extended by
  the steps the missing time buys at the rate so far, until it is long enough.
- The total, fixed at the window's last step ``s``: ``s + floor((budget - elapsed) * rate)``, at
  least ``s``: the budget minus the time already spent (all sessions) at the measured rate.
- What the budget covers: the training clock only. Periodic kNN evaluations (eval.knn_every), the
  start-up, the initial and final kNN are outside it. Checkpoints are counted as they are spent
  but not forecast.
- Before the total is fixed the schedules do not depend on it: lr = peak * step / W below the
  warm-up length W (optim.warmup_epochs in steps), peak after it; tau = tau_base. From the fixed
  step on they are the schedules of the fixed total, ending at it (lr 0, tau 1).
- The total is saved in the checkpoint: a resume keeps it, measures nothing and continues the
  same schedules bitwise. A run stopped before the total was fixed measures again on resume
  (a new window from the resume step; the time spent so far still counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from byol.config.sections import parse_budget  # noqa: F401 (the duration rule lives with the config)

WARMUP_STEPS = 3  # untimed steps first: kernel selection, allocator, caches
MEASURE_STEPS = 10  # timed steps whose mean rate fixes the total: at least these
MEASURE_FRACTION = 0.05  # and at least this share of the budget (30 s of 10 minutes)

def total_steps(step: int, elapsed_s: float, rate: float, budget_s: float) -> int:
    """The total that ends within ``budget_s``: the steps the time left buys at ``rate``, after ``step``."""
    left = max(0.0, budget_s - elapsed_s)
    return step + math.floor(left * rate)


@dataclass
class Fixed:
    total: int
    step: int  # the step the total was fixed at
    rate: float  # steps/s over the window
    measured: int  # steps in the window
    elapsed_s: float  # training time spent when fixed
    budget_s: float


class BudgetMeter:
    """The measuring window of one session, from ``start_step`` on."""

    def __init__(self, budget_s: float, start_step: int) -> None:
        self.budget_s = budget_s
        self.t0_step = start_step + WARMUP_STEPS
        self.fix_step = self.t0_step + MEASURE_STEPS
        self._t0: float | None = None

    def wants_time(self, step: int) -> bool:
        """Whether ``after_step`` needs the elapsed time at ``step`` (the window's two ends)."""
        return step in (self.t0_step, self.fix_step)

    def after_step(self, step: int, elapsed_s: float) -> Fixed | None:
        if step == self.t0_step:
            self._t0 = elapsed_s
        if step != self.fix_step or self._t0 is None:
            return None
        spent = max(elapsed_s - self._t0, 1e-9)
        measured = step - self.t0_step
        rate = measured / spent
        short = MEASURE_FRACTION * self.budget_s - spent
        if short > 0:  # too short a window: measure on for the missing time at the rate so far
            self.fix_step = step + max(1, math.ceil(short * rate))
            return None
        return Fixed(total_steps(step, elapsed_s, rate, self.budget_s), step, rate, measured,
                     elapsed_s, self.budget_s)


def fixed_line(fixed: Fixed, steps_per_epoch: int, text: str) -> str:
    """The one line a budgeted run prints when its total is fixed."""
    left = max(0.0, fixed.budget_s - fixed.elapsed_s)
    epochs = fixed.total / steps_per_epoch if steps_per_epoch else 0.0
    return (f"budget {text}: {fixed.rate:.3g} steps/s over {fixed.measured} steps (after {WARMUP_STEPS} "
            f"warm-up steps); {left:.1f} s left of {fixed.budget_s:g} s after {fixed.elapsed_s:.1f} s spent "
            f"-> {fixed.total} steps in all (~{epochs:.2f} epochs; optim.epochs ignored). The budget is "
            f"training time (data, steps, checkpoints); periodic and final kNN evaluations are outside it")
