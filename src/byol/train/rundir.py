"""The run directory and its logs: config.yaml, metrics.jsonl (source of truth), tensorboard.

    runs/<name>/config.yaml      the resolved config
    runs/<name>/metrics.jsonl    one JSON object per logged step
    runs/<name>/tb/              tensorboard events (same numbers)
    runs/<name>/checkpoints/     last.pt (+ epoch_NNNN.pt)
    runs/<name>/eval/            knn.json, knn_init.json, ...
    runs/<name>/skipped_files.tsv  unreadable images that were skipped (when any)
    runs/<name>/summary.json     steps done / total, training time, images/s, collapse

Also the run's start lines (``start_summary``) and its directory, named on rank 0 under DDP.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from byol import distributed
from byol.files import atomic_write_text
from byol.models.named import is_named
from byol.optim.schedules import scaled_lr
from byol.train.budget import MEASURE_FRACTION, MEASURE_STEPS, REPLAN_FRACTION, WARMUP_STEPS, parse_budget
from byol.train.checkpoint import CHECKPOINT_DIR
from byol.train.runtime import isa_cap_without_bf16


def new_run_dir(out_dir: str, name: str | None, stem: str) -> Path:
    """``out_dir/name``, or ``out_dir/<stem>-<timestamp>`` (with a suffix if it exists)."""
    base = Path(out_dir) / (name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    path, n = base, 1
    while name is None and path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class MetricsLogger:
    """Appends metrics to metrics.jsonl and tensorboard. Rank 0 only; others do nothing."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, purge_step: int | None = None) -> None:
        self.active = distributed.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if self.active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events logged after the checkpoint a resume starts from
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        row = {"step": step, "time": time.time(), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def write_json(path: Path, obj: dict) -> None:
    """``obj`` as indented JSON to ``path``, atomically (rank 0 only)."""
    if distributed.is_main():
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _step_of(line) != float("inf")]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after ``step`` (the checkpoint a resume starts from), so
    the resumed run does not log those steps twice. Atomic: a kill meanwhile keeps the old log."""
    path = Path(run_dir) / "metrics.jsonl"
    if not distributed.is_main() or not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    """Step of a metrics line; a torn line (a hard kill while writing) counts as after all."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def open_new_run(cfg, stem: str) -> Path:
    """A fresh run directory, named on rank 0 (its clock) and shared with every rank."""
    run_dir, error = None, None
    if distributed.is_main():
        run_dir = new_run_dir(cfg.train.out_dir, cfg.train.name, stem)
        if (run_dir / "metrics.jsonl").exists() or (run_dir / CHECKPOINT_DIR).exists():
            error = (f"train.name: run directory {run_dir} already holds a run; "
                     f"continue it with --resume {run_dir} or choose another train.name")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
    run_dir, error = distributed.broadcast_object((run_dir, error))
    if error:
        raise ValueError(error)
    return run_dir


def start_summary(cfg, data, model, device, precision, workers, run_dir, step, chosen=None) -> str:
    """The lines a run prints when it starts: data, model, optimisation, device; then what
    ``auto`` chose and why, and the notes (``chosen``: byol.auto.choose.Chosen)."""
    n_train = len(data.views)
    held = f", {len(data.test)} held out for kNN, {data.num_classes} classes" if data.test else ""
    if getattr(data.source, "labels", None) is None:
        held = " (unlabelled: no kNN evaluation)"
    steps = n_train // cfg.optim.batch_size
    params = sum(p.numel() for p in model.encoder.parameters()) / 1e6
    m = cfg.model
    # a torchvision/timm backbone: width and stem are our ResNets' options
    shape = "" if is_named(m.backbone) else f" x{m.width:g}{' (CIFAR stem)' if m.cifar_stem else ''}"
    extras = [f"padding={m.padding}"] if m.padding != "symmetric" else []
    extras += [f"init from {m.init}"] if m.init else []
    accumulate = cfg.optim.accumulate_steps
    micro = f" ({accumulate} micro-batches of {cfg.optim.batch_size // accumulate})" if accumulate > 1 else ""
    start = f"resuming at step {step}" if step else "starting"
    evaluated = f", evaluated at {cfg.augment.eval_px} px" if cfg.augment.eval_px != cfg.augment.size else ""
    return (
        f"{start}: {run_dir}\n"
        f"  data:   {n_train} training images{held}\n"
        + (f"  shards: {data.source.describe()}\n" if hasattr(data.source, "describe") else "") +
        f"  model:  {m.backbone}{shape}, {params:.2f}M encoder parameters"
        f"{''.join(', ' + e for e in extras)}\n"
        f"  augment: {cfg.augment.semantics} semantics, {cfg.augment.backend} backend, "
        f"{cfg.augment.size} px{evaluated}\n"
        f"  optim:  {cfg.optim.name}, batch {cfg.optim.batch_size}{micro}, {_length(cfg, steps)}, peak lr "
        f"{scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size):g}, tau {cfg.method.tau_base}"
        f"{' (constant)' if cfg.method.tau_schedule == 'constant' else ' -> 1'}\n"
        f"  device: {device} ({precision}{_capped(cfg, device)}), {workers} loader workers"
        + "".join(f"\n  auto:   {c.line()}" for c in (chosen.choices if chosen else ()))
        + "".join(f"\n  note:   {n}" for n in (chosen.notes if chosen else ()))
    )


def _capped(cfg, device) -> str:
    """Why ``precision=auto`` kept fp32 on a CPU that has bf16, when an ISA cap is the reason."""
    cap = isa_cap_without_bf16() if cfg.train.precision == "auto" and device.type == "cpu" else None
    return f": {cap} caps the instruction set below native bf16" if cap else ""


def _length(cfg, steps: int) -> str:
    """The run's length: epochs x steps, or the time budget that fixes it (train/budget.py)."""
    if cfg.train.budget is None:
        return f"{steps} steps/epoch x {cfg.optim.epochs} epochs = {steps * cfg.optim.epochs} steps"
    return (f"{steps} steps/epoch, time budget {cfg.train.budget} ({parse_budget(cfg.train.budget):g} s for the "
            f"whole command: training gets what the start-up and the initial and final kNN leave): the total "
            f"steps follow from the rate of at least {MEASURE_STEPS} steps and {MEASURE_FRACTION:.0%} of the budget "
            f"after {WARMUP_STEPS} warm-up steps, re-planned every {REPLAN_FRACTION:.0%} of it (optim.epochs ignored)")


def write_summary(cfg, state, run_dir, result, device, precision) -> None:
    """summary.json: where the run stands (read by `byol report`). elapsed_s is the training wall
    time over all sessions: data, steps and checkpoints, not the evaluations."""
    elapsed = state.elapsed_s
    steps_per_epoch = state.n_train // cfg.optim.batch_size
    total = steps_per_epoch * cfg.optim.epochs
    if cfg.train.budget is not None:  # the total the budget fixed (None while still measuring)
        total = state.planned_steps
    write_json(run_dir / "summary.json", {
        "step": state.step, "total_steps": total, "steps_per_epoch": steps_per_epoch, "finished": result.finished,
        "elapsed_s": elapsed, "images_per_s": state.step * cfg.optim.batch_size / elapsed if elapsed else None,
        "collapsed": result.collapsed_at is not None, "collapsed_at_step": result.collapsed_at,
        "device": str(device), "precision": precision,
        "diverged": result.diverged is not None, "diverged_at_step": (result.diverged or {}).get("step"),
        "last_good_checkpoint_step": (result.diverged or {}).get("last_good_step"),
        "skipped_samples": len(result.skipped),  # skipped_files.tsv's records: bad files, members, shards
        "knn_top1": result.knn["top1"] if result.knn else None,
        "online_linear_top1": result.online_linear["top1"] if result.online_linear else None,
    })
