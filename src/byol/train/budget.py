"""A time budget for a run (``train.budget=10m``): measure the step rate, fix the total steps, re-plan it.

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
- Re-planning (``Replanner``): once fixed, the total is forecast again every ``REPLAN_FRACTION``
  of the budget, or every ``REPLAN_LEFT`` of the time left when that is shorter (counted in steps
  at the planned rate, so every rank checks at the same step; at least ``MEASURE_STEPS`` apart),
  from the rate over the last two intervals between checks (so one interval that held a periodic
  evaluation, or a moment of another process's work, is averaged with the one before). A forecast that moves the end
  by less than ``REPLAN_TOLERANCE`` of the budget (in time) changes nothing; otherwise the steps
  left change by at most ``REPLAN_BOUND``
  each time (a rate measured while another process was busy for a moment cannot wipe out the
  schedule's tail at once; a lasting change is followed over the next checks). Simulated in
  tests/test_budget.py: half the CPU taken from the middle of a 600-s run on ends it at 600 s. Each new total is saved
  in the checkpoint, and a resume takes it up where the session before left it.
- What the budget covers: the whole command, within a few seconds (Python's start): the training
  clock gets the budget less what ``pretrain`` spent before training (start-up, the initial kNN)
  and less the same again for the final kNN (``reserve_s``: the final kNN is the initial one's
  work). Periodic kNN evaluations (eval.knn_every) run on the training clock, so the re-planning
  absorbs them. Checkpoints are counted as they are spent but not forecast.
- Before the total is fixed the schedules do not depend on it: lr = peak * step / W below the
  warm-up length W (optim.warmup_epochs in steps), peak after it; tau = tau_base. From the fixed
  step on they are the schedules of the fixed total, ending at it (lr 0, tau 1).
- The total (the last re-planned one), the training budget and the re-planning's checks are
  saved in the checkpoint: a resume keeps them, measures no new window, continues the same
  schedules bitwise and checks at the same steps (the rate of a check that spans the two sessions
  is over training time: the pause between them does not count). A run stopped before the total
  was fixed measures again on resume (a new window from the resume step; the time spent so far
  still counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from byol import distributed
from byol.config.sections import parse_budget  # the duration rule lives with the config

if TYPE_CHECKING:  # the loop's parts that the budget steers
    from byol.config import Config
    from byol.train.runtime import Runtime
    from byol.train.state import TrainState

WARMUP_STEPS = 3  # untimed steps first: kernel selection, allocator, caches
MEASURE_STEPS = 10  # timed steps whose mean rate fixes the total: at least these
MEASURE_FRACTION = 0.05  # and at least this share of the budget (30 s of 10 minutes)

REPLAN_FRACTION = 0.1  # the total is forecast again every 10% of the budget,
REPLAN_LEFT = 0.25  # or every quarter of the time left, when that is shorter (the end nears)
REPLAN_TOLERANCE = 0.01  # a forecast that moves the end by less than 1% of the budget changes nothing
REPLAN_BOUND = 0.5  # one re-plan changes the steps left by at most half
MIN_TRAINING_SHARE = 0.1  # training keeps at least this share of a budget the evaluations would eat


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


@dataclass
class Replan:
    total: int
    was: int  # the total before
    step: int
    rate: float  # steps/s since the last check
    measured: int  # steps since the last check
    elapsed_s: float
    budget_s: float


class Replanner:
    """The checks of a fixed total, from ``step`` on (see the module's rule). ``checks`` is its
    whole state, ``[step and training time of the check before the last, of the last check, the
    next check's step]``: saved in the checkpoint, so that a resumed run checks at the steps the
    uninterrupted one would."""

    def __init__(self, budget_s: float, step: int, elapsed_s: float, total: int,
                 checks: list | None = None) -> None:
        self.budget_s = budget_s
        if checks is not None and len(checks) == 5:
            self.base = (int(checks[0]), float(checks[1]))
            self.last = (int(checks[2]), float(checks[3]))
            self.next_step = int(checks[4])
        else:
            self.base = (step, elapsed_s)
            self._from(step, elapsed_s, total)

    @property
    def checks(self) -> list:
        return [*self.base, *self.last, self.next_step]

    def _from(self, step: int, elapsed_s: float, total: int, measured_rate: float = math.inf) -> None:
        """The next check, spaced in steps at the planned rate, or at the measured one when that is
        lower (a machine that slowed down is checked again as soon in time as one that did not)."""
        self.last = (step, elapsed_s)
        left_s = self.budget_s - elapsed_s
        planned_rate = (total - step) / left_s if left_s > 0 else math.inf
        every = min(REPLAN_FRACTION * self.budget_s, REPLAN_LEFT * left_s) * min(planned_rate, measured_rate)
        self.next_step = step + max(MEASURE_STEPS, math.ceil(every) if math.isfinite(every) else MEASURE_STEPS)

    def wants_time(self, step: int) -> bool:
        return step == self.next_step

    def after_step(self, step: int, elapsed_s: float, total: int) -> Replan | None:
        """At a check: the new total when the rate over the last two intervals moves it enough."""
        if step != self.next_step or step >= total:
            return None
        measured = step - self.base[0]
        rate = measured / max(elapsed_s - self.base[1], 1e-9)
        forecast = total_steps(step, elapsed_s, rate, self.budget_s)
        left = total - step
        bounded = min(max(forecast, step + math.floor(left * (1 - REPLAN_BOUND))),
                      step + math.ceil(left * (1 + REPLAN_BOUND)))
        if elapsed_s >= self.budget_s:  # the budget is spent: end now, whatever the bound
            bounded = step
        changed = abs(bounded - total) > max(1.0, REPLAN_TOLERANCE * self.budget_s * rate)
        new = bounded if changed else total
        self.base = self.last
        self._from(step, elapsed_s, new, rate)
        return Replan(new, total, step, rate, measured, elapsed_s, self.budget_s) if changed else None


def replan_line(r: Replan) -> str:
    return (f"budget: re-planned at step {r.step}: {r.rate:.3g} steps/s over the last {r.measured} steps, "
            f"{max(0.0, r.budget_s - r.elapsed_s):.1f} s left -> {r.total} steps in all (was {r.was})")


def fixed_line(fixed: Fixed, steps_per_epoch: int, text: str) -> str:
    """The one line a budgeted run prints when its total is fixed."""
    left = max(0.0, fixed.budget_s - fixed.elapsed_s)
    epochs = fixed.total / steps_per_epoch if steps_per_epoch else 0.0
    return (f"budget {text}: {fixed.rate:.3g} steps/s over {fixed.measured} steps (after {WARMUP_STEPS} "
            f"warm-up steps); {left:.1f} s left of {fixed.budget_s:g} s after {fixed.elapsed_s:.1f} s spent "
            f"-> {fixed.total} steps in all (~{epochs:.2f} epochs; optim.epochs ignored), re-planned as the "
            f"rate changes. The budget covers the whole command: the start-up and the initial and final kNN "
            f"are taken out of the training time")


class Budget:
    """train.budget in the loop: time a window of the first steps, fix the plan's total, then
    re-plan it as the rate changes (the rule above). Nothing to do without a budget. ``reserve_s``: what the command
    spends outside training (start-up, initial and final kNN), taken out of the budget once; the
    training budget and the re-planning's checks are kept in the checkpoint (``state.budget_s``,
    ``state.budget_checks``) for a resume. ``plan``, ``clock`` and ``log`` are the loop's
    (train/loop.py: Plan, Clock, _Log; not imported here: the loop imports this module)."""

    def __init__(self, cfg: Config, plan, state: TrainState, reserve_s: float = 0.0) -> None:
        self.text = cfg.train.budget
        self.meter = self.replanner = None
        if self.text is None:
            return
        if state.budget_s is None:  # a new run (or one from before budgets were kept)
            whole = parse_budget(self.text)
            state.budget_s = max(whole - reserve_s, MIN_TRAINING_SHARE * whole)
        if plan.total is None:
            self.meter = BudgetMeter(state.budget_s, state.step)
        else:  # a resumed run whose total is fixed: the checks where the last session left them
            self.replanner = Replanner(state.budget_s, state.step, state.elapsed_s, plan.total, state.budget_checks)
            state.budget_checks = self.replanner.checks

    def _wants_time(self, step: int) -> bool:
        return ((self.meter is not None and self.meter.wants_time(step))
                or (self.replanner is not None and self.replanner.wants_time(step)))

    def after_step(self, state: TrainState, plan, clock, rt: Runtime, log) -> None:
        if not self._wants_time(state.step):
            return
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)  # the steps queued so far are done: the clock is true
        clock.fold()
        # rank 0's clock on every rank: each rank's meter then extends its window to the same steps
        # and fixes the same total (their own clocks differ a little, and a rank that asks for the
        # time at another step than the others would wait in this broadcast forever)
        elapsed = distributed.broadcast_object(state.elapsed_s)
        if self.meter is not None:
            fixed = self.meter.after_step(state.step, elapsed)
            if fixed is not None:
                self.meter, state.planned_steps = None, fixed.total
                plan.fix(fixed.total)
                self.replanner = Replanner(state.budget_s, state.step, elapsed, fixed.total)
                log.fixed(state.step, fixed, plan, fixed_line(fixed, plan.steps_per_epoch, self.text))
        else:
            replan = self.replanner.after_step(state.step, elapsed, plan.total)
            if replan is not None:
                state.planned_steps = replan.total
                plan.fix(replan.total)
                log.replanned(replan, plan)
        if self.replanner is not None:
            state.budget_checks = self.replanner.checks
