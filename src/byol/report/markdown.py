"""summary.md: where a run stands, its final numbers, its evaluations, its plots and its config."""
from __future__ import annotations

import math
from pathlib import Path

from byol.report.rundata import RunData

_EVAL_DETAIL_KEYS = 6  # scalar details per eval row beyond top-1/top-5; more would not fit a line


def _cell(value) -> str:
    """A value as a table cell: short floats, and no '|' (it would end the cell)."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_cell(v) for v in value) + "]"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |"
                    for row in rows]


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s % 60:02d} s" if m else f"{seconds:.1f} s"


def _percent(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _yes_no(flag: bool | None, unknown: str = "unknown") -> str:
    return unknown if flag is None else "**yes**" if flag else "no"


def status_section(run: RunData) -> list[str]:
    """Steps done / total, finished or not, wall time, images/s, device."""
    step = run.summary.get("step", run.last_step)
    total = run.total_steps
    done = f"{step} / {total} ({100 * step / total:.0f}%)" if total else f"{step} (total unknown)"
    finished = run.summary.get("finished")
    if finished is None:
        state = "unknown (no current summary.json: still running, or killed)"
    elif finished:
        state = "yes"
    else:
        state = f"no: stopped early; continue with `byol pretrain --resume {run.run_dir}`"
    seconds, source = run.wall_time()
    rate, how = run.images_per_s()
    device = run.summary.get("device") or f"not recorded (train.device={run.cfg('train', 'device', '?')})"
    if run.summary.get("precision"):
        device += f" ({run.summary['precision']})"
    rows = [
        ("steps", done),
        ("finished", state),
        ("wall time", f"{_duration(seconds)} ({source})" if seconds is not None else "unknown"),
        ("images/s", f"{rate:.1f} ({how})" if rate is not None else "unknown"),
        ("device", device),
    ]
    if run.skipped_files is not None:
        rows.append(("skipped files", f"{run.skipped_files} (skipped_files.tsv)"))
    return ["## Training status", "", *_table(("", ""), rows)]


def final_section(run: RunData) -> list[str]:
    """The last logged value of each training metric, and the collapse verdict."""
    names = {"loss": "loss", "z_std": "z_std (~1 healthy, 0 collapsed)",
             "z_rank": "effective rank of z", "y_rank": "effective rank of y",
             "online_linear_top1": "online linear top-1, training batches (%)"}
    rows = [(label, run.last(key)) for key, label in names.items() if run.last(key) is not None]
    collapsed = _yes_no(run.collapsed, "unknown (not logged)")
    if run.collapsed_at is not None:
        collapsed += f" at step {run.collapsed_at} (z_std < {run.collapse_threshold:g})"
    rows.append(("collapsed", collapsed))
    step = run.train_rows[-1]["step"] if run.train_rows else run.last_step
    return [f"## Final metrics (step {step})", "", *_table(("metric", "value"), rows)]


def eval_section(run: RunData) -> list[str]:
    """Every eval/*.json with a top1: top-1, top-5 and its other scalar keys."""
    lines = ["## Evaluation", ""]
    if not run.evals:
        lines.append("No evaluation results (eval/*.json with top1) in this run.")
    else:
        rows = []
        for name, obj in run.evals.items():
            details = [f"{k}={_cell(v)}" for k, v in obj.items() if k not in ("top1", "top5")
                       and isinstance(v, (int, float, str)) and len(str(v)) <= 40]
            rows.append((f"`{name}`", _percent(obj.get("top1")), _percent(obj.get("top5")),
                         ", ".join(details[:_EVAL_DETAIL_KEYS])))
        lines += _table(("evaluation", "top-1 (%)", "top-5 (%)", "details"), rows)
    if run.eval_notes:
        lines += [""] + [f"- {note}" for note in run.eval_notes]
    return lines


def plots_section(written: list[Path], skipped: dict[str, str], out_dir: Path) -> list[str]:
    """The images, linked relative to summary.md, and why any plot is missing."""
    lines = ["## Plots", ""]
    for path in written:
        lines += [f"![{path.stem}]({path.relative_to(out_dir).as_posix()})", ""]
    lines += [f"- Not plotted: {name}: {reason}." for name, reason in skipped.items()]
    return lines


def config_section(run: RunData) -> list[str]:
    """config.yaml, one row per section: key=value pairs."""
    lines = ["## Config", ""]
    if run.config_note:
        return lines + [f"Not available: {run.config_note}"]
    rows = [(f"`{name}`", " ".join(f"{k}={_cell(v)}" for k, v in body.items()))
            for name, body in run.config.items() if isinstance(body, dict)]
    return lines + _table(("section", "settings"), rows)


def write_markdown(run: RunData, written: list[Path], skipped: dict[str, str], out_dir: Path) -> Path:
    """Write out_dir/summary.md and return its path."""
    head = [f"# Run report: {run.name}", "", f"Run directory: `{run.run_dir.resolve()}`", ""]
    sections = [status_section(run), final_section(run), eval_section(run),
                plots_section(written, skipped, out_dir), config_section(run)]
    text = "\n".join(head + [line for s in sections for line in s + [""]])
    path = out_dir / "summary.md"
    path.write_text(text)
    return path
