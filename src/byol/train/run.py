"""The run directory and its logs: config.yaml, metrics.jsonl (source of truth), tensorboard.

    runs/<name>/config.yaml      the resolved config
    runs/<name>/metrics.jsonl    one JSON object per logged step
    runs/<name>/tb/              tensorboard events (same numbers)
    runs/<name>/checkpoints/     last.pt (+ epoch_NNNN.pt)
    runs/<name>/eval/            knn.json, knn_init.json, ...
    runs/<name>/skipped_files.tsv  unreadable images that were skipped (when any)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from byol import distributed


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
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _step_of(line) != float("inf")]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows logged after ``step`` (the checkpoint a resume starts from), so
    the resumed run does not log those steps twice."""
    path = Path(run_dir) / "metrics.jsonl"
    if not distributed.is_main() or not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _step_of(line) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    """Step of a metrics line; a torn line (a hard kill while writing) counts as after all."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
