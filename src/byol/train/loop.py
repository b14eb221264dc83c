"""The training loop: step, log, epoch end (evaluate, checkpoint), checkpoint, stop.

    end = train_loop(cfg, state, data, runtime, run_dir, monitors, guard, purge=resumed)

Everything the loop needs is built before it starts (train/pretrain.py); each named part below
does one job. The loop advances ``state`` (a TrainState: model, optimizer, position, clock) and
returns how it ended. Stats stay on the device between log rows: a log row is the loop's only
host sync (and the guard reads its flag there); an evaluation or a checkpoint syncs anyway.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from byol import distributed
from byol.config import Config
from byol.data.pipeline import TrainBatches
from byol.optim import constant_tau, cosine_tau, scaled_lr, warmup_cosine_lr
from byol.train.budget import Budget, replan_line
from byol.train.checkpoint import CHECKPOINT_DIR, CheckpointWriteError, save_checkpoint
from byol.train.guard import NonFiniteGuard
from byol.train.monitors import Monitors, progress_postfix, val_row
from byol.train.rundir import MetricsLogger
from byol.train.runtime import Runtime, StopFlag
from byol.train.state import TrainState
from byol.train.step import train_step
from byol.train.threads import make_governor

now = time.monotonic  # the loop's clock; tests put a fake one here


def clock_now() -> float:
    """The loop's clock, for the command's own timing (a fake one in tests reaches it too)."""
    return now()


@dataclass
class LoopEnd:
    step: int
    finished: bool  # reached the schedule's last step
    interrupted: bool = False  # SIGINT/SIGTERM
    diverged: dict | None = None  # {"step", "what", "last_good_step"[, "skips"]}


class Plan:
    """How long the run is and the schedules over it: lr and tau as pure functions of the step
    (docs/method.md §1, §4). A step is an optimizer step: with optim.accumulate_steps=N each one
    takes the global batch in N micro-batches (train/step.py), and the schedules are those of N=1.

    The total is optim.epochs x steps per epoch, or under train.budget the ``planned`` total the
    budget fixed (None until it is measured; train/budget.py states the schedules before that)."""

    def __init__(self, cfg: Config, n_images: int, planned: int | None = None) -> None:
        self.batch = cfg.optim.batch_size
        self.accumulate = cfg.optim.accumulate_steps
        self.steps_per_epoch = n_images // self.batch
        self.max_steps = cfg.train.max_steps
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.peak = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
        self.tau_base = cfg.method.tau_base
        self.tau_fn = cosine_tau if cfg.method.tau_schedule == "cosine" else constant_tau
        self.fix(planned if cfg.train.budget else cfg.optim.epochs * self.steps_per_epoch)

    def fix(self, total: int | None) -> None:
        """Lay the schedules over ``total`` steps (None: a budget not measured yet, no end known)."""
        self.total = total
        ends = [n for n in (total, self.max_steps) if n is not None]
        self.stop_at = min(ends) if ends else math.inf
        self.warmup = self.warmup_steps if total is None else min(total, self.warmup_steps)
        # the epoch whose end is the schedule's end (its kNN is the final one), -1: none known
        self.last_epoch = -1 if total is None or not self.steps_per_epoch else -(-total // self.steps_per_epoch)

    def lr(self, step: int) -> float:
        if self.total is None:  # the budget's measuring steps: the warm-up ramp, no total in it
            return self.peak * min(1.0, step / self.warmup) if self.warmup else self.peak
        return warmup_cosine_lr(step, self.total, self.warmup, self.peak)

    def tau(self, step: int) -> float:
        return self.tau_base if self.total is None else self.tau_fn(step, self.total, self.tau_base)


class Clock:
    """The run's training time (``state.elapsed_s``: data, steps, checkpoints; not evaluations)
    and the images/s of each log interval."""

    def __init__(self, state: TrainState, clock=None) -> None:
        self.state = state
        self.now = clock or now
        self._t = self._t_log = self.now()
        self._images = 0

    def count(self, images: int) -> None:
        self._images += images

    def rate(self) -> float:
        """images/s since the previous call; starts the next interval."""
        t = self.now()
        rate, self._t_log, self._images = self._images / max(t - self._t_log, 1e-9), t, 0
        return rate

    def fold(self) -> None:
        """Add the time since the last fold to state.elapsed_s (before a checkpoint saves it)."""
        t = self.now()
        self.state.elapsed_s += t - self._t
        self._t = t

    @contextlib.contextmanager
    def paused(self):
        t = self.now()
        yield
        spent = self.now() - t
        self._t += spent
        self._t_log += spent


def train_loop(cfg: Config, state: TrainState, data, rt: Runtime, run_dir: Path, monitors: Monitors,
               guard: NonFiniteGuard, *, purge: bool, reserve_s: float = 0.0) -> LoopEnd:
    """Train from ``state``'s position to ``cfg.train.max_steps`` or the schedule's end
    (``reserve_s``: the command's time outside training, taken out of a train.budget)."""
    plan = Plan(cfg, len(data.views), state.planned_steps)
    budget = Budget(cfg, plan, state, reserve_s)
    skip = cfg.train.nonfinite == "skip"
    if cfg.train.compile:
        state.model.compile()  # in place: forward compiled, parameter names unchanged
    model = distributed.wrap(state.model.train(), rt.device)  # DDP when torchrun started us
    batches = TrainBatches(data.views, cfg, rt.device, rt.workers, rank=rt.rank, world=rt.world)
    log = _Log(cfg, plan, state, run_dir, purge)
    clock, governor = Clock(state), make_governor(cfg.train.threads, rt.device)
    end = LoopEnd(state.step, finished=False)
    try:
        with StopFlag() as stop:
            for v1, v2, labels in _batches(batches, state, plan):
                lr, tau = plan.lr(state.step), plan.tau(state.step)
                stats, outputs = train_step(model, state.optimizer, v1, v2, lr=lr, tau=tau, precision=rt.precision,
                                            skip_nonfinite=skip, accumulate_steps=plan.accumulate)
                state.step += 1
                skipped = _watch(stats, state, guard, skip, end, log)
                if end.diverged is not None:
                    break
                if not skipped:
                    monitors.after_step(state.step, outputs, labels)
                state.step_in_epoch += 1
                clock.count(plan.batch)
                budget.after_step(state, plan, clock, rt, log)
                log.bar.update(1)
                _govern(governor, state, rt)
                if log.due(state.step, monitors):
                    log.row(state, stats, lr, tau, clock.rate(), monitors, governor)
                    if _check(guard, state, end, log, weights=False):
                        break
                if state.step_in_epoch == plan.steps_per_epoch:  # epoch end
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                    if _check(guard, state, end, log, weights=True):
                        break  # before the evaluation and the checkpoint: neither sees a bad state
                    _evaluate_if_due(plan, state, monitors, log, clock, budgeted=cfg.train.budget is not None)
                    _checkpoint(state, run_dir, guard, clock, keep=_keep_epoch(cfg, state.epoch))
                elif state.step % cfg.train.checkpoint_every == 0:
                    if _check(guard, state, end, log, weights=True):
                        break
                    _checkpoint(state, run_dir, guard, clock)
                end.interrupted = _stop_requested(stop, state, cfg, rt)
                if state.step >= plan.stop_at or end.interrupted:
                    break
        clock.fold()
        if end.diverged is None and not _check(guard, state, end, log, weights=True):
            _checkpoint(state, run_dir, guard, clock)
    finally:
        log.close()
        if governor is not None:
            governor.restore()
    end.step = state.step
    end.finished = plan.total is not None and state.step >= plan.total and end.diverged is None
    return end


def _batches(batches: TrainBatches, state: TrainState, plan: Plan):
    """Device-ready views from ``state``'s position on, epoch after epoch, up to the stop step."""
    while state.step < plan.stop_at:
        if state.step_in_epoch >= plan.steps_per_epoch:  # never spin on an empty epoch
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        yield from batches.epoch(state.epoch, step_in_epoch=state.step_in_epoch, step=state.step)


def _watch(stats: dict, state: TrainState, guard: NonFiniteGuard, skip: bool, end: LoopEnd, log) -> bool:
    """Fold this step's loss into the guard (no sync), or under train.nonfinite=skip count a
    skipped step (its decision already synced). -> whether the step was skipped."""
    if not skip:
        guard.observe(stats["loss"], state.step)
        return False
    skipped = bool(stats["skipped"])
    if guard.note_skip(skipped):
        _diverged(end, (state.step, "skips"), state, guard, log)
    return skipped


def _check(guard: NonFiniteGuard, state: TrainState, end: LoopEnd, log, *, weights: bool) -> bool:
    """Read the guard (collective under DDP); ``weights``: every tensor a checkpoint would hold
    too. -> whether the run diverged (then ``end.diverged`` says how)."""
    bad = guard.first_bad_step(_state_tensors(state) if weights else None)
    return bad is not None and _diverged(end, bad, state, guard, log)


def _diverged(end: LoopEnd, bad: tuple[int, str], state: TrainState, guard: NonFiniteGuard, log) -> bool:
    step, what = bad
    end.diverged = {"step": step if step >= 0 else state.step, "what": what,
                    "last_good_step": guard.last_good_step}
    if what == "skips":
        end.diverged["skips"] = guard.consecutive_skips
    log.logger.log(state.step, {"event": "diverged", **end.diverged})
    return True


def _state_tensors(state: TrainState):
    """Every floating-point tensor a checkpoint holds: model, optimizer state, online classifier."""
    yield from state.model.state_dict().values()
    for per_param in state.optimizer.state.values():
        yield from (v for v in per_param.values() if hasattr(v, "is_floating_point"))
    if state.probe is not None:
        yield from state.probe.state_dict().values()
        for per_param in state.probe.optimizer.state.values():
            yield from (v for v in per_param.values() if hasattr(v, "is_floating_point"))


def _evaluate_if_due(plan: Plan, state: TrainState, monitors: Monitors, log, clock: Clock, budgeted: bool) -> None:
    """The held-out kNN of eval.knn_every, before the epoch's checkpoint: a kill in between reruns
    it on resume instead of losing its row. Its time is not training time, except under a budget:
    there it is spent inside the command's time, and the re-planning absorbs it."""
    if not monitors.due(state.epoch, plan.last_epoch):
        return
    with contextlib.nullcontext() if budgeted else clock.paused():
        if distributed.is_main():
            log.logger.log(state.step, {"epoch": state.epoch, **val_row(monitors.evaluate(state.model))})
        distributed.barrier()


def _keep_epoch(cfg: Config, epoch: int) -> str | None:
    keep = cfg.train.keep_every_epochs
    return f"epoch_{epoch:04d}.pt" if keep and epoch % keep == 0 else None


def _checkpoint(state: TrainState, run_dir: Path, guard: NonFiniteGuard, clock: Clock, *,
                keep: str | None = None) -> None:
    """Write the state as checkpoints/last.pt (rank 0); every rank learns whether that worked."""
    clock.fold()
    error = None
    if distributed.is_main():
        try:
            save_checkpoint(state.state_dict(), run_dir / CHECKPOINT_DIR, keep_as=keep)
        except CheckpointWriteError as e:
            error = e
    if distributed.any_rank(error is not None):
        raise error or CheckpointWriteError("rank 0 could not write its checkpoint")
    guard.last_good_step = state.step


def _govern(governor, state: TrainState, rt: Runtime) -> None:
    """Fewer threads beside a busy process, all of them again once it stops (train/threads.py)."""
    if governor is not None and governor.tick() is not None and rt.main:
        tqdm.write(f"byol: other processes keep {governor.other_cores:.1f} CPU cores busy: "
                   f"{governor.threads} of {governor.max_threads} threads from step {state.step}",
                   file=sys.stderr)


def _stop_requested(stop: StopFlag, state: TrainState, cfg: Config, rt: Runtime) -> bool:
    """One process: stop at the next step; under DDP the ranks agree on it at log steps."""
    if rt.world == 1:
        return stop.set
    return state.step % cfg.train.log_every == 0 and distributed.any_rank(stop.set)


class _Log:
    """metrics.jsonl + tensorboard (rank 0) and the progress bar."""

    def __init__(self, cfg: Config, plan: Plan, state: TrainState, run_dir: Path, purge: bool) -> None:
        self.every, self.stop_at = cfg.train.log_every, plan.stop_at
        # rows at the checkpoint's own step are kept (truncate_metrics keeps <= step): purge after it
        self.logger = MetricsLogger(run_dir, purge_step=state.step + 1 if purge else None)
        self.bar = tqdm(total=plan.total, initial=state.step, unit="step", dynamic_ncols=True,
                        disable=not (cfg.train.progress and distributed.is_main()))

    def due(self, step: int, monitors: Monitors) -> bool:
        return step % self.every == 0 or monitors.wants_row(step) or step == self.stop_at

    def row(self, state: TrainState, stats: dict, lr: float, tau: float, rate: float, monitors: Monitors,
            governor) -> None:
        stats = distributed.all_reduce_mean(stats)  # the mean over ranks, for the log
        row = {k: float(v) for k, v in stats.items()}  # the host sync
        row.update(lr=lr, tau=tau, epoch=state.epoch, images_per_s=rate)
        if governor is not None:
            row["threads"] = governor.threads
        row.update(monitors.log_values(state.step, row))
        self.logger.log(state.step, row)
        self.bar.set_postfix(progress_postfix(row, lr, tau), refresh=False)

    def fixed(self, step: int, fixed, plan: Plan, line: str) -> None:
        """A budget fixed the total: its line (stdout), its event row, the bar's new length."""
        self._event(step, {"event": "budget", "total_steps": fixed.total, "steps_per_s": fixed.rate,
                           "measured_steps": fixed.measured, "elapsed_s": fixed.elapsed_s,
                           "budget_s": fixed.budget_s}, plan, line)

    def replanned(self, r, plan: Plan) -> None:
        """A budget re-planned the total (train/budget.py Replanner)."""
        self._event(r.step, {"event": "budget_replan", "total_steps": r.total, "was": r.was, "steps_per_s": r.rate,
                             "measured_steps": r.measured, "elapsed_s": r.elapsed_s, "budget_s": r.budget_s},
                    plan, replan_line(r))

    def _event(self, step: int, row: dict, plan: Plan, line: str) -> None:
        self.stop_at = plan.stop_at
        self.logger.log(step, row)
        self.bar.total = plan.total
        if distributed.is_main():
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
        self.logger.close()
