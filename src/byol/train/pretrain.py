"""A pretraining run from start to end: runtime, data, model, the run directory (locked), the
loop, the final evaluation, summary.json.

    result = pretrain(cfg)                      # a new run under cfg.train.out_dir
    result = pretrain(cfg, resume="runs/x")     # continue runs/x from its newest good checkpoint

The step loop itself is train/loop.py; the files of a run are train/rundir.py (logs, summary) and
train/checkpoint.py (checkpoints).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Subset

from byol import distributed
from byol.auto.choose import Chosen, auto_comments, choose_settings
from byol.config import Config, ConfigError, config_to_dict, replace, save_config
from byol.config.loading import leading_comments
from byol.config.sections import auto_keys
from byol.data.errors import DataError
from byol.data.pretrain import build_pretrain_data
from byol.data.sources import heldout_split, open_images
from byol.data.workers import default_workers
from byol.eval.features import iter_features
from byol.eval.knn import evaluate_knn
from byol.files import SHARED_MEMORY, errno_of, refused_write
from byol.train.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointWriteError,
    copy_checkpoint,
    load_checkpoint,
    load_newest,
    remove_stale_temp_files,
    set_aside,
)
from byol.train.guard import NonFiniteGuard, TrainingDiverged
from byol.train.lock import RunLock
from byol.train.loop import clock_now, train_loop
from byol.train.monitors import Monitors, final_eval, make_probe
from byol.train.rundir import open_new_run, start_summary, truncate_metrics, write_json, write_summary
from byol.train.runtime import Runtime, start_runtime
from byol.train.setup import build_model_and_optimizer
from byol.train.skipped import collect_skips, merge_skipped, share_skips
from byol.train.state import TrainState


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


def pretrain(cfg: Config, *, resume: str | Path | None = None, stem: str = "byol") -> PretrainResult:
    """Train ``cfg`` from scratch, or continue the run directory ``resume``."""
    started = clock_now()  # a train.budget covers the command from here (train/budget.py)
    rt = start_runtime(cfg, default_workers)
    if cfg.data.path and resume is None:  # the run must find its data from any directory later
        cfg = replace(cfg, data={"path": str(Path(cfg.data.path).expanduser().resolve())})
    if resume is not None and auto_keys(cfg):
        raise ConfigError(f"--resume: {auto_keys(cfg)[0]}=auto in the run's config.yaml; a run saves the "
                          "values it chose, so this config was not written by a run")
    raw = open_images(cfg.data)
    n_train = len(heldout_split(cfg.data, raw)[0])
    cfg, chosen = choose_settings(cfg, raw, n_train, rt)  # before the seed: no draws
    _check_micro_batches(cfg, rt.world)
    torch.manual_seed(cfg.train.seed)
    data = build_pretrain_data(cfg, raw)
    model, optimizer = build_model_and_optimizer(cfg, rt.device, data if resume is None else None,
                                                 init=resume is None)
    state = TrainState(model, optimizer, config=config_to_dict(cfg), n_train=len(data.views),
                       probe=make_probe(cfg, data, model.feature_dim, rt.device))
    result = PretrainResult(Path(resume or cfg.train.out_dir), 0, finished=False, skipped=data.skipped)
    try:
        with contextlib.ExitStack() as held:
            if resume is not None:
                run_dir = Path(resume)
                held.enter_context(_run_lock(run_dir))  # before anything in it is read or changed
                result.resumed_from = _resume_state(state, run_dir, cfg)
                _check_same_data(state, data, cfg)
                truncate_metrics(run_dir, state.step)
            else:
                run_dir = open_new_run(cfg, stem)
                held.enter_context(_run_lock(run_dir))
            result.run_dir, result.step = run_dir, state.step
            _run(cfg, state, data, rt, run_dir, result, chosen, resumed=resume is not None, started=started)
    except (CheckpointWriteError, TrainingDiverged, KeyboardInterrupt):
        raise
    except Exception as e:  # the disk refused a write anywhere in the run, in any layer: one line, exit 4
        why = refused_write(e)
        if why is None:
            raise
        where = "" if why.startswith(SHARED_MEMORY) else f"cannot write in {result.run_dir}: "
        raise CheckpointWriteError(f"{where}{why}; the checkpoints in {result.run_dir / CHECKPOINT_DIR} are intact",
                                   errno_of(e)) from e  # BYOL_DEBUG=1 shows e
    return result


def _check_micro_batches(cfg: Config, world: int) -> None:
    """Each rank's batch (optim.batch_size / processes) splits into optim.accumulate_steps
    micro-batches (of two samples at least with batch norm, which normalises each micro-batch by
    its own statistics), or the run stops before it starts with one line naming the keys."""
    per_rank, n = cfg.optim.batch_size // world, cfg.optim.accumulate_steps
    if per_rank % n:
        raise ConfigError(f"config: optim.batch_size={cfg.optim.batch_size} over {world} processes is "
                          f"{per_rank} per process, not a multiple of optim.accumulate_steps={n}")
    m = cfg.model
    if per_rank // n < 2 and "bn" in (m.backbone_norm, m.head_norm, m.predictor_norm or m.head_norm):
        raise ConfigError(f"config: optim.batch_size={cfg.optim.batch_size} over {world} processes in "
                          f"optim.accumulate_steps={n} micro-batches is 1 image each: batch norm needs two")


def _run(cfg: Config, state: TrainState, data, rt: Runtime, run_dir: Path, result: PretrainResult,
         chosen: Chosen, resumed: bool, started: float) -> None:
    """The locked part of a run: config, start lines, training, final evaluation, summary."""
    if rt.main:
        saved = run_dir / "config.yaml"  # a resume keeps the reasons of what auto chose at the start
        save_config(cfg, saved, leading_comments(saved) if resumed else auto_comments(chosen))
        merge_skipped(run_dir, data.skipped)
        print(start_summary(cfg, data, state.model, rt.device, rt.precision, rt.workers, run_dir,
                            state.step, chosen), flush=True)
    shared = share_skips(data.source, run_dir, rt)  # before any loader starts its workers
    knn_s = 0.0
    if cfg.eval.initial_knn and data.bank is not None and state.step == 0 and rt.main:
        t = clock_now()
        result.knn_init = _knn(cfg, state.model, data, rt)
        knn_s = clock_now() - t
        write_json(run_dir / "eval" / "knn_init.json", result.knn_init)
    distributed.barrier()
    # a budget's reserve: what the command spent so far, and the final kNN (the initial one's work)
    final_knn_s = 0.0
    if (cfg.train.budget is not None and state.budget_s is None and cfg.eval.final_knn and data.bank is not None
            and rt.main):  # a new budget (a resume keeps the training budget it had)
        final_knn_s = knn_s or _knn_seconds(cfg, state.model, data, rt)
    reserve_s = distributed.broadcast_object(clock_now() - started + final_knn_s)  # rank 0's: one plan
    monitors = Monitors(cfg, state, data, rt.device, rt.workers)
    start_step = state.step
    guard = NonFiniteGuard(rt.device)
    guard.last_good_step = state.step if resumed else None
    try:
        end = train_loop(cfg, state, data, rt, run_dir, monitors, guard, purge=resumed, reserve_s=reserve_s)
    except CheckpointWriteError:
        with contextlib.suppress(OSError):  # the disk may be full for this small file too
            write_summary(cfg, state, run_dir, result, rt.device, rt.precision)
        raise
    result.step, result.finished, result.interrupted = end.step, end.finished, end.interrupted
    result.diverged, result.collapsed_at = end.diverged, monitors.collapsed_at
    already_done = (run_dir / "eval" / "knn.json").is_file() and start_step == state.step
    if result.finished and cfg.eval.final_knn and monitors.can_evaluate() and not already_done and rt.main:
        final_eval(cfg, state, monitors, run_dir, result)
    result.skipped = collect_skips(data.source, shared, run_dir, rt)  # + those met while loading
    write_summary(cfg, state, run_dir, result, rt.device, rt.precision)
    distributed.barrier()
    if result.diverged is not None:
        raise TrainingDiverged(_diverged_message(cfg, run_dir, result.diverged), result=result)


def _knn(cfg: Config, model, data, rt: Runtime) -> dict:
    return evaluate_knn(
        model.encoder, data.bank, data.test, num_classes=data.num_classes, k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature, batch_size=cfg.eval.batch_size, device=rt.device,
        workers=rt.workers, progress=cfg.train.progress,
    )


def _knn_seconds(cfg: Config, model, data, rt: Runtime, batches: int = 3) -> float:
    """What a kNN evaluation will take, when no initial one was timed: the features of a few
    held-out batches (the first one untimed: kernels, allocator) scaled to the bank and the test
    images, plus a tenth for the rest (similarities, the online classifier's pass)."""
    n = min(len(data.test), batches * cfg.eval.batch_size)
    first = min(n, cfg.eval.batch_size)
    if n <= first:
        return 0.0
    devices = [rt.device] if rt.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the loader draws a seed: the run's draws stay the same
        feats = iter_features(model.encoder, Subset(data.test, range(n)), batch_size=cfg.eval.batch_size,
                              device=rt.device, workers=rt.workers)
        next(feats)
        t = clock_now()
        for _ in feats:
            pass
        per_image = (clock_now() - t) / (n - first)
    return 1.1 * per_image * (len(data.bank) + len(data.test))


def _check_same_data(state: TrainState, data, cfg: Config) -> None:
    """A resume must see the images the run started with, or its sampler position is void."""
    n0 = state.n_train
    if n0 is not None and n0 != len(data.views):
        raise DataError(f"--resume: the run trained on {n0} images but {cfg.data.path or cfg.data.dataset} "
                        f"now gives {len(data.views)}; resume needs the same data")


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


def _resume_state(state: TrainState, run_dir: Path, cfg: Config) -> Path:
    """Load the newest checkpoint of run_dir that verifies. Rank 0 chooses it and every rank
    loads that same file; rank 0 sets damaged newer ones aside (never rotated over a good copy),
    drops temp files of killed writes and redoes an epoch copy a kill prevented. -> the file."""
    chosen, error = None, None
    if distributed.is_main():
        try:
            loaded = load_newest(run_dir)
            chosen = loaded.path
        except DataError as e:
            error = str(e)
    chosen, error = distributed.broadcast_object((chosen, error))
    if error:
        raise DataError(error)
    state.load_state_dict(loaded.state if distributed.is_main() else load_checkpoint(chosen))
    if state.probe is not None:
        state.probe.set_lr(cfg.eval.online_linear_lr)
    distributed.barrier()  # every rank has read its checkpoint before rank 0 renames any
    if distributed.is_main():
        for path, reason in loaded.passed_over:
            aside = set_aside(path)
            print(f"byol: warning: {reason}; moved it to {aside.name} and resumed from "
                  f"{chosen.name} (step {state.step})", file=sys.stderr, flush=True)
        remove_stale_temp_files(run_dir / CHECKPOINT_DIR)
        _redo_epoch_copy(run_dir / CHECKPOINT_DIR, chosen, state, cfg.train.keep_every_epochs)
    return chosen


def _redo_epoch_copy(ckpt_dir: Path, chosen: Path, state: TrainState, keep: int) -> None:
    """A kill (or a full disk) between an epoch's last.pt and its epoch_NNNN.pt copy: make it now."""
    if keep and state.step_in_epoch == 0 and state.epoch and state.epoch % keep == 0:
        kept = ckpt_dir / f"epoch_{state.epoch:04d}.pt"
        if not kept.exists():
            try:
                copy_checkpoint(chosen, kept)
            except OSError as e:  # best effort: the run itself does not need the copy
                print(f"byol: warning: could not keep {kept.name}: {e.strerror or e}",
                      file=sys.stderr, flush=True)


def _diverged_message(cfg: Config, run_dir: Path, d: dict) -> str:
    what = {"loss": "non-finite loss", "weights": "non-finite weights",
            "skips": f"{d.get('skips')} consecutive steps with non-finite gradients"}[d["what"]]
    good = d["last_good_step"]
    kept = (f"no checkpoint was written from the bad state; the last good one is step {good} in "
            f"{run_dir / CHECKPOINT_DIR}" if good is not None else "no checkpoint had been written yet")
    lr = cfg.optim.base_lr
    then = (f"continue with: byol pretrain --resume {run_dir} optim.base_lr={lr / 2:g}" if good is not None
            else "start again with a lower optim.base_lr")
    skip = "" if cfg.train.nonfinite == "skip" else " (or train.nonfinite=skip)"
    return (f"training diverged: {what} at step {d['step']}; {kept}. Lower optim.base_lr (now {lr:g}) "
            f"or check the data, then {then}{skip}")
