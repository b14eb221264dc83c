"""Everything `byol report` reads from a run directory, gathered once into a ``RunData``.

Every input but metrics.jsonl is optional: a run that is still going has no summary.json, an
unlabelled one has no eval/, an old one may lack keys that newer runs log. Missing pieces become
``None`` (or empty) and the report says so instead of failing.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from byol.config import ConfigError, Eval, read_yaml
from byol.data.errors import DataError
from byol.train.rundir import read_metrics


@dataclass
class RunData:
    """A run as the report sees it: its log split into training and held-out monitor rows."""

    run_dir: Path
    config: dict  # raw nested sections from config.yaml ({} when missing)
    config_note: str | None  # why the config could not be read
    train_rows: list[dict]  # rows with a "loss" (logged every train.log_every steps)
    monitor_rows: list[dict]  # rows with val_* keys (held-out kNN / online linear)
    evals: dict[str, dict]  # eval/<name>.json with a top1 key, by file stem
    eval_notes: list[str]  # eval files that could not be read
    summary: dict  # summary.json ({} when absent)
    skipped_files: int | None  # lines of skipped_files.tsv (None: no such file)

    @property
    def name(self) -> str:
        """The run's name: its directory's."""
        return self.run_dir.resolve().name

    def cfg(self, section: str, key: str, default=None):
        """``config.yaml``'s ``section.key``, or ``default`` when absent."""
        body = self.config.get(section)
        return body.get(key, default) if isinstance(body, dict) else default

    def series(self, key: str, rows: list[dict] | None = None) -> tuple[list[float], list[float]]:
        """(steps, values) of the finite ``key`` values among ``rows`` (default: training rows)."""
        steps, values = [], []
        for row in self.train_rows if rows is None else rows:
            v = row.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(row["step"])
                values.append(float(v))
        return steps, values

    def last(self, key: str):
        """The value of ``key`` in the last training row that has it (may be nan), else None."""
        for row in reversed(self.train_rows):
            if key in row:
                return row[key]
        return None

    @property
    def last_step(self) -> int:
        return max(row["step"] for row in self.train_rows + self.monitor_rows)

    @property
    def collapse_threshold(self) -> float:
        value = self.cfg("eval", "collapse_threshold", Eval.collapse_threshold)
        return float(value) if isinstance(value, (int, float)) else Eval.collapse_threshold

    @property
    def collapsed_at(self) -> int | None:
        """First step flagged as collapsed: summary.json, else the first row with collapsed=1."""
        if self.summary.get("collapsed_at_step") is not None:
            return int(self.summary["collapsed_at_step"])
        return next((row["step"] for row in self.train_rows if row.get("collapsed")), None)

    @property
    def collapsed(self) -> bool | None:
        """Whether the run collapsed; None when nothing in the run says (no flag ever logged)."""
        if "collapsed" in self.summary:
            return bool(self.summary["collapsed"])
        if self.collapsed_at is not None:
            return True
        return False if any("collapsed" in row for row in self.train_rows) else None

    @property
    def steps_per_epoch(self) -> float | None:
        """From summary.json (its steps_per_epoch; in runs written before it, total_steps over
        optim.epochs, which a time budget would get wrong), else from a monitor row (logged at the
        end of an epoch, so its step is epoch x steps_per_epoch)."""
        if isinstance(self.summary.get("steps_per_epoch"), int) and self.summary["steps_per_epoch"] > 0:
            return self.summary["steps_per_epoch"]
        epochs = self.cfg("optim", "epochs")
        total = self.summary.get("total_steps")
        if isinstance(total, int) and isinstance(epochs, int) and total > 0 and epochs > 0:
            return total / epochs
        for row in self.monitor_rows:
            if isinstance(row.get("epoch"), int) and row["epoch"] > 0:
                return row["step"] / row["epoch"]
        return None

    @property
    def total_steps(self) -> int | None:
        if isinstance(self.summary.get("total_steps"), int):
            return self.summary["total_steps"]
        spe, epochs = self.steps_per_epoch, self.cfg("optim", "epochs")
        return round(spe * epochs) if spe and isinstance(epochs, int) else None

    def wall_time(self) -> tuple[float | None, str]:
        """(seconds, source): summary.json's training time, else the span of the log's timestamps
        (which misses the time before the first logged step and counts pauses between resumes)."""
        if isinstance(self.summary.get("elapsed_s"), (int, float)):
            return float(self.summary["elapsed_s"]), "summary.json"
        times = [row["time"] for row in self.train_rows + self.monitor_rows if "time" in row]
        if len(times) < 2:
            return None, "metrics.jsonl"
        return max(times) - min(times), "metrics.jsonl timestamps"

    def images_per_s(self) -> tuple[float | None, str]:
        """(images/s, how): summary.json's overall throughput, else the mean of the logged rates."""
        if isinstance(self.summary.get("images_per_s"), (int, float)):
            return float(self.summary["images_per_s"]), "overall"
        _, rates = self.series("images_per_s")
        return (statistics.fmean(rates), "mean of logged rows") if rates else (None, "")


def read_run(run_dir: str | Path) -> RunData:
    """Read a run directory; DataError (one line, naming the path) when it is not one."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise DataError(f"report: run directory not found: {run_dir}")
    if not run_dir.is_dir():
        raise DataError(f"report: {run_dir} is a file, not a run directory")
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"report: {run_dir} has no metrics.jsonl (not a run directory of byol pretrain?)")
    rows = [row for row in read_metrics(run_dir) if isinstance(row, dict) and isinstance(row.get("step"), int)]
    if not rows:
        raise DataError(f"report: {run_dir / 'metrics.jsonl'} has no logged steps yet")
    config, config_note = {}, None
    try:
        config = read_yaml(run_dir / "config.yaml")
    except ConfigError as exc:
        config_note = str(exc)
    evals, eval_notes = _read_evals(run_dir / "eval")
    summary = _read_json(run_dir / "summary.json") or {}
    if isinstance(summary.get("step"), int) and summary["step"] < max(row["step"] for row in rows):
        summary = {}  # written when an earlier session stopped; the run was resumed since
    return RunData(
        run_dir=run_dir, config=config, config_note=config_note,
        train_rows=[r for r in rows if "loss" in r],
        monitor_rows=[r for r in rows if any(k.startswith("val_") for k in r)],
        evals=evals, eval_notes=eval_notes, summary=summary,
        skipped_files=_count_lines(run_dir / "skipped_files.tsv"),
    )


def _read_json(path: Path) -> dict | None:
    """A JSON object, or None when the file is missing, torn or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _read_evals(folder: Path) -> tuple[dict[str, dict], list[str]]:
    evals, notes = {}, []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        obj = _read_json(path)
        if obj is None:
            notes.append(f"eval/{path.name} could not be read (not a JSON object)")
        elif "top1" in obj:
            evals[path.stem] = obj
    return evals, notes


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())
