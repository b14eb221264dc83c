"""The pretraining loop: data, model, schedules, logging, checkpoints, resume, final kNN.

    result = pretrain(cfg)                      # a new run under cfg.train.out_dir
    result = pretrain(cfg, resume="runs/x")     # continue runs/x from checkpoints/last.pt
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from byol import distributed
from byol.config import Config, config_to_dict, replace, save_config
from byol.data.errors import DataError
from byol.data.folder import write_skipped
from byol.data.loader import DeviceViews, ResumableSampler, build_pretrain_data, default_workers, loader
from byol.eval.knn import evaluate_knn
from byol.optim import cosine_tau, constant_tau, scaled_lr, warmup_cosine_lr
from byol.train.run import MetricsLogger, open_new_run, start_summary, truncate_metrics, write_json, write_summary
from byol.train.checkpoint import (CHECKPOINT_DIR, CheckpointWriteError, load_newest, remove_stale_temp_files,
                                   save_checkpoint, set_aside)
from byol.train.guard import NonFiniteGuard, TrainingDiverged
from byol.train.lock import RunLock
from byol.train.state import TrainState
from byol.train.monitors import Monitors, final_eval, make_probe, progress_postfix, val_row
from byol.train.runtime import StopFlag, resolve_device
from byol.train.setup import apply_runtime, build_model_and_optimizer
from byol.train.step import train_step
from byol.train.threads import make_governor


@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    finished: bool  # False when stopped early (max_steps or a signal); resume to continue
    knn: dict | None = None
    knn_init: dict | None = None
    online_linear: dict | None = None  # held-out accuracy of the online classifier at the end
    collapsed_at: int | None = None  # first step whose projections were flagged as collapsed
    skipped: list = field(default_factory=list)
    interrupted: bool = False  # stopped by SIGINT/SIGTERM
    diverged: dict | None = None  # {"step", "what", "last_good_step"} when the guard stopped the run
    resumed_from: Path | None = None  # the checkpoint a resume loaded


class Schedules:
    """lr and tau as pure functions of the global step (PAPER.md §1, §4)."""

    def __init__(self, cfg: Config, steps_per_epoch: int) -> None:
        self.total = cfg.optim.epochs * steps_per_epoch
        self.warmup = min(self.total, round(cfg.optim.warmup_epochs * steps_per_epoch))
        self.peak = scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size)
        self.tau_base = cfg.method.tau_base
        self.tau_fn = cosine_tau if cfg.method.tau_schedule == "cosine" else constant_tau

    def lr(self, step: int) -> float:
        return warmup_cosine_lr(step, self.total, self.warmup, self.peak)

    def tau(self, step: int) -> float:
        return self.tau_fn(step, self.total, self.tau_base)


def _knn(cfg: Config, model, data, device, workers: int) -> dict:
    return evaluate_knn(
        model.encoder, data.bank, data.test, num_classes=data.num_classes, k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature, batch_size=cfg.eval.batch_size, device=device,
        workers=workers, progress=cfg.train.progress,
    )


def _check_same_data(state: TrainState, data, cfg: Config) -> None:
    """A resume must see the images the run started with, or its sampler position is void."""
    n0 = state.extra.get("n_train")
    if n0 is not None and n0 != len(data.views):
        raise DataError(f"--resume: the run trained on {n0} images but {cfg.data.path or cfg.data.dataset} "
                        f"now gives {len(data.views)}; resume needs the same data")


def _save(state: TrainState, run_dir: Path, guard: NonFiniteGuard, *, keep_epoch: int | None = None) -> None:
    """Write the state as checkpoints/last.pt (rank 0); every rank learns whether that worked."""
    error = None
    if distributed.is_main():
        try:
            save_checkpoint(state.state_dict(), run_dir / CHECKPOINT_DIR,
                            keep_as=None if keep_epoch is None else f"epoch_{keep_epoch:04d}.pt")
        except CheckpointWriteError as e:
            error = e
    if distributed.any_rank(error is not None):
        raise error or CheckpointWriteError("rank 0 could not write its checkpoint")
    guard.last_good_step = state.step


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Hold run_dir's lock (rank 0, the writer) for the whole run; every rank sees a refusal."""
    lock, error = RunLock(run_dir), None
    if distributed.is_main():
        try:
            lock.acquire()
        except DataError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise DataError(error)
    try:
        yield
    finally:
        lock.release()


def _resume_state(state: TrainState, run_dir: Path) -> Path:
    """Load the newest checkpoint of run_dir that verifies; set damaged newer ones aside (rank 0,
    never rotated over a good copy) and drop temp files of killed writes. -> the file used."""
    loaded = load_newest(run_dir)
    state.load_state_dict(loaded.state)
    distributed.barrier()  # every rank has read its checkpoint before rank 0 renames any
    if distributed.is_main():
        for path, reason in loaded.passed_over:
            aside = set_aside(path)
            print(f"byol: warning: {reason}; moved it to {aside.name} and resumed from "
                  f"{loaded.path.name} (step {state.step})", file=sys.stderr, flush=True)
        remove_stale_temp_files(run_dir / CHECKPOINT_DIR)
    return loaded.path


def pretrain(cfg: Config, *, resume: str | Path | None = None, stem: str = "byol") -> PretrainResult:
    """Train ``cfg`` from scratch, or continue the run directory ``resume``."""
    device = resolve_device(cfg.train.device)
    distributed.init_from_env(device.type)  # torchrun: join the group, one process per device
    if distributed.world_size() > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
    if cfg.optim.batch_size % distributed.world_size():
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} must be a multiple of the "
                         f"{distributed.world_size()} processes (it is the global batch)")
    precision = apply_runtime(cfg, device)
    if cfg.data.path and resume is None:  # the run must find its data from any directory later
        cfg = replace(cfg, data={"path": str(Path(cfg.data.path).expanduser().resolve())})
    torch.manual_seed(cfg.train.seed)
    data = build_pretrain_data(cfg)
    model, optimizer = build_model_and_optimizer(cfg, device, data if resume is None else None)
    state = TrainState(model, optimizer, extra={"config": config_to_dict(cfg), "elapsed": 0.0,
                                                "n_train": len(data.views)},
                       probe=make_probe(cfg, data, model.feature_dim, device))
    result = PretrainResult(Path(resume) if resume is not None else Path(), 0, finished=False,
                            skipped=data.skipped)
    with contextlib.ExitStack() as held:
        if resume is not None:
            run_dir = Path(resume)
            held.enter_context(_run_lock(run_dir))  # before anything in it is read or changed
            result.resumed_from = _resume_state(state, run_dir)
            if state.probe is not None:
                state.probe.set_lr(cfg.eval.online_linear_lr)
            _check_same_data(state, data, cfg)
            truncate_metrics(run_dir, state.step)
        else:
            run_dir = open_new_run(cfg, stem)
            held.enter_context(_run_lock(run_dir))
        result.run_dir, result.step = run_dir, state.step
        _run(cfg, state, data, model, device, precision, run_dir, result, resume is not None)
    return result


def _run(cfg, state, data, model, device, precision, run_dir, result, resumed: bool) -> None:
    """The locked part of a run: config, start lines, training, final evaluation, summary."""
    if distributed.is_main():
        save_config(cfg, run_dir / "config.yaml")
        if data.skipped:
            write_skipped(data.skipped, run_dir / "skipped_files.tsv")
    workers = default_workers(cfg.data.num_workers, device)
    if distributed.is_main():
        print(start_summary(cfg, data, model, device, precision, workers, run_dir, state.step), flush=True)
    if cfg.eval.initial_knn and data.bank is not None and state.step == 0 and distributed.is_main():
        result.knn_init = _knn(cfg, model, data, device, workers)
        write_json(run_dir / "eval" / "knn_init.json", result.knn_init)
    distributed.barrier()
    monitors = Monitors(cfg, state, data, device, workers)
    start_step = state.step
    guard = NonFiniteGuard(device)
    guard.last_good_step = state.step if resumed else None
    try:
        _train(cfg, state, data, run_dir, device, precision, monitors, result, guard, purge=resumed)
    except CheckpointWriteError:
        with contextlib.suppress(OSError):  # the disk may be full for this small file too
            write_summary(cfg, state, run_dir, result, device, precision)
        raise
    skipped = list(getattr(data.source, "skipped", []))  # + files that failed to decode while loading
    if distributed.is_main() and len(skipped) > len(data.skipped):
        write_skipped(skipped, run_dir / "skipped_files.tsv")
        result.skipped = skipped
    already_done = (run_dir / "eval" / "knn.json").is_file() and start_step == state.step
    if (result.finished and cfg.eval.final_knn and monitors.can_evaluate() and not already_done
            and distributed.is_main()):
        final_eval(cfg, state, monitors, run_dir, result)
    write_summary(cfg, state, run_dir, result, device, precision)
    distributed.barrier()
    if result.diverged is not None:
        raise TrainingDiverged(_diverged_message(cfg, run_dir, result.diverged), result=result)


def _diverged_message(cfg: Config, run_dir: Path, d: dict) -> str:
    what = {"loss": "non-finite loss", "weights": "non-finite weights",
            "skips": f"{d.get('skips')} consecutive steps with non-finite gradients"}[d["what"]]
    good = d["last_good_step"]
    kept = (f"no checkpoint was written from the bad state; the last good one is step {good} in "
            f"{run_dir / CHECKPOINT_DIR}" if good is not None else "no checkpoint had been written yet")
    lr = cfg.optim.base_lr
    then = (f"continue with: byol pretrain --resume {run_dir} optim.base_lr={lr / 2:g}" if good is not None
            else "start again with a lower optim.base_lr")
    return (f"training diverged: {what} at step {d['step']}; {kept}. Lower optim.base_lr (now {lr:g}) "
            f"or check the data, then {then} (or train.nonfinite=skip)")


def _state_tensors(state: TrainState):
    """Every tensor a checkpoint would hold from the model and the online classifier."""
    yield from state.model.state_dict().values()
    if state.probe is not None:
        yield from state.probe.state_dict().values()


def _train(cfg, state, data, run_dir, device, precision, monitors, result, guard, purge=False) -> None:
    """The epoch loop: step, log every N steps, checkpoint, stop at max_steps, a signal or a
    non-finite loss (``guard``: then nothing is saved and ``result.diverged`` says why)."""
    batch = cfg.optim.batch_size
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    steps_per_epoch = len(data.views) // batch
    sched = Schedules(cfg, steps_per_epoch)
    stop_at = min(sched.total, cfg.train.max_steps or sched.total)
    world = distributed.world_size()
    skip_nonfinite = cfg.train.nonfinite == "skip"
    sampler = ResumableSampler(len(data.views), seed=cfg.train.seed, rank=distributed.rank(),
                               world_size=world, batch_size=batch)
    # rows at the checkpoint's own step are kept (truncate_metrics keeps <= step): purge after it
    logger = MetricsLogger(run_dir, purge_step=state.step + 1 if purge else None)
    bar = tqdm(total=sched.total, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not (cfg.train.progress and distributed.is_main()))
    if cfg.train.compile:
        state.model.compile()  # in place: forward compiled, parameter names unchanged
    model = distributed.wrap(state.model.train(), device)  # DDP when torchrun started us
    device_views = DeviceViews(cfg.augment, cfg.train.seed) if cfg.augment.backend == "batched" else None
    t_start, t_log, n_log = time.time(), time.time(), 0
    stopping = False
    governor = make_governor(cfg.train.threads, device)  # fewer threads beside a busy process

    def diverged(bad: tuple[int, str] | None) -> bool:
        """Record a guard reading that found a problem: the log row, result.diverged."""
        if bad is None:
            return False
        step, what = bad
        result.diverged = {"step": step if step >= 0 else state.step, "what": what,
                           "last_good_step": guard.last_good_step}
        if what == "skips":
            result.diverged["skips"] = guard.consecutive_skips
        logger.log(state.step, {"event": "diverged", **result.diverged})
        return True

    # One loader for the whole run (its workers persist across epochs): the sampler carries the
    # epoch in every key and the views are seeded per sample, so worker seeds never matter. The
    # loader takes its worker seeds from its own generator, never the global RNG.
    dl = loader(data.views, batch // world, workers=monitors.workers, sampler=sampler, drop_last=True,
                pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.train.seed),
                persistent=True)
    try:
        with StopFlag() as stop:
            while state.step < stop_at and not stopping and result.diverged is None:
                if state.step_in_epoch >= steps_per_epoch:  # never spin on an empty epoch
                    state.epoch, state.step_in_epoch = state.epoch + 1, 0
                sampler.set_epoch(state.epoch, start=state.step_in_epoch * batch)
                for v1, v2, labels in dl:
                    v1, v2 = (v.to(device, non_blocking=True) for v in (v1, v2))
                    if device_views is not None:  # uint8 crops -> the rest of T and T', batched
                        v1, v2 = device_views(v1, v2, state.step, distributed.rank())
                    v1, v2 = (v.contiguous(memory_format=memory_format) for v in (v1, v2))
                    lr, tau = sched.lr(state.step), sched.tau(state.step)
                    stats, outputs = train_step(model, state.optimizer, v1, v2, lr=lr, tau=tau,
                                                precision=precision, return_outputs=True,
                                                skip_nonfinite=skip_nonfinite)
                    state.step += 1
                    if skip_nonfinite:  # the step already synced to decide; nothing changed if skipped
                        skipped = bool(stats["skipped"])
                        if guard.note_skip(skipped) and diverged((state.step, "skips")):
                            break
                    else:
                        skipped = False
                        guard.observe(stats["loss"], state.step)
                    if not skipped:
                        monitors.after_step(state.step, outputs, labels)
                    state.step_in_epoch += 1
                    n_log += batch
                    bar.update(1)
                    if governor is not None and governor.tick() is not None and distributed.is_main():
                        tqdm.write(f"byol: other processes keep {governor.other_cores:.1f} CPU cores busy: "
                                   f"{governor.threads} of {governor.max_threads} threads from step "
                                   f"{state.step}", file=sys.stderr)
                    if (state.step % cfg.train.log_every == 0 or monitors.wants_row(state.step)
                            or state.step == stop_at):
                        now = time.time()
                        stats = distributed.all_reduce_mean(stats)  # the mean over ranks, for the log
                        row = {k: float(v) for k, v in stats.items()}  # the only host sync
                        row.update(lr=lr, tau=tau, epoch=state.epoch, images_per_s=n_log / (now - t_log))
                        if governor is not None:
                            row["threads"] = governor.threads
                        row.update(monitors.log_values(state.step, row))
                        logger.log(state.step, row)
                        bar.set_postfix(progress_postfix(row, lr, tau), refresh=False)
                        t_log, n_log = now, 0
                        if diverged(guard.first_bad_step()):
                            break
                    if state.step_in_epoch == steps_per_epoch:
                        state.epoch, state.step_in_epoch = state.epoch + 1, 0
                        if diverged(guard.first_bad_step(_state_tensors(state))):
                            break  # before the evaluation and the checkpoint: neither sees the bad state
                        if monitors.due(state.epoch, cfg.optim.epochs):  # before the checkpoint: a
                            # kill in between reruns it on resume instead of losing its row
                            t_eval = time.time()
                            if distributed.is_main():
                                logger.log(state.step, {"epoch": state.epoch,
                                                        **val_row(monitors.evaluate(state.model))})
                            distributed.barrier()
                            t_start += time.time() - t_eval  # "elapsed" is training time only
                            t_log += time.time() - t_eval
                        keep = cfg.train.keep_every_epochs
                        state.extra["elapsed"] += time.time() - t_start
                        t_start = time.time()
                        _save(state, run_dir, guard,
                              keep_epoch=state.epoch if keep and state.epoch % keep == 0 else None)
                    elif state.step % cfg.train.checkpoint_every == 0:
                        if diverged(guard.first_bad_step(_state_tensors(state))):
                            break
                        state.extra["elapsed"] += time.time() - t_start
                        t_start = time.time()
                        _save(state, run_dir, guard)
                    # one process: stop at the next step; under DDP the ranks agree on it at log steps
                    stopping = stop.set if world == 1 else (
                        state.step % cfg.train.log_every == 0 and distributed.any_rank(stop.set))
                    if state.step >= stop_at or stopping:
                        break
        state.extra["elapsed"] += time.time() - t_start
        if result.diverged is None and not diverged(guard.first_bad_step(_state_tensors(state))):
            _save(state, run_dir, guard)
    finally:
        bar.close()
        logger.close()
    result.step = state.step
    result.finished = state.step >= sched.total and result.diverged is None
    result.interrupted = stopping
    result.collapsed_at = monitors.collapsed_at
