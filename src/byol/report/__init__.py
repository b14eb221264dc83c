"""`byol report RUN_DIR`: plots and a summary.md for a pretraining run directory.

    from byol.report import make_report
    out = make_report("runs/demo-20261123-073959")   # -> runs/demo-.../report/
    out["plots"]    # [.../loss.png, .../schedules.png, .../collapse.png, .../accuracy.png]
    out["summary"]  # .../summary.md (status, final metrics, eval table, plots, config)

Reads config.yaml, metrics.jsonl, summary.json, eval/*.json and skipped_files.tsv (rundata.py);
draws loss, schedules (lr, tau), collapse (z_std, effective ranks) and accuracy (held-out kNN,
online linear) against the step (plots.py); writes summary.md linking the images (markdown.py).
A plot whose data the run did not log is skipped and summary.md says why.
"""
from __future__ import annotations

from pathlib import Path

from byol.data.errors import DataError
from byol.report.rundata import RunData, read_run

__all__ = ["RunData", "make_report", "read_run"]


def make_report(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write the PNG plots and summary.md of ``run_dir`` into ``out_dir`` (default
    ``run_dir/report``). Returns {"dir": out_dir, "plots": [png paths], "skipped": {png: why},
    "summary": summary.md path}. DataError (one line, naming the path) when ``run_dir`` is not a
    run directory or ``out_dir`` cannot be a folder."""
    from byol.report.markdown import write_markdown
    from byol.report.plots import draw_all  # matplotlib: imported only when a report is made

    run = read_run(run_dir)
    out = Path(run_dir) / "report" if out_dir is None else Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"report: output folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = draw_all(run, out)
    summary = write_markdown(run, written, skipped, out)
    return {"dir": out, "plots": written, "skipped": skipped, "summary": summary}
