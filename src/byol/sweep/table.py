"""A sweep's outputs: one row per finished cell, as CSV, a markdown table and a plot."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from byol.report.plots import BLUE, DPI, GREY, RED, STYLE, save_figure
from byol.report.rundata import read_run
from byol.sweep.grids import Cell, Grid

COLUMNS = ("cell", "settings", "knn_top1", "knn_init_top1", "knn_gain", "z_std", "z_rank", "y_rank",
           "collapsed", "diverged_at", "steps", "train_s")


def _top1(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def result_row(grid: Grid, cell: Cell, cell_dir: Path) -> dict:
    """What the table shows of a finished cell, read back from its run directory."""
    run = read_run(cell_dir)
    knn, init = _top1(cell_dir / "eval" / "knn.json"), _top1(cell_dir / "eval" / "knn_init.json")
    last = {key: (run.series(key)[1] or [None])[-1] for key in ("z_std", "z_rank", "y_rank")}
    return {
        "cell": cell.label,
        "settings": " ".join(f"{k}={v}" for k, v in cell.overrides.items()) or "baseline",
        "knn_top1": knn, "knn_init_top1": init,
        "knn_gain": knn - init if knn is not None and init is not None else None,
        **last,
        "collapsed": bool(run.summary.get("collapsed")),
        "diverged_at": run.summary.get("diverged_at_step"),  # a non-finite loss stopped it there
        "steps": run.last_step, "train_s": run.wall_time()[0],
        "series": cell.series, "x": cell.x,
    }


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    header = ("cell", "settings", "kNN top-1", "random init", "gain", "z_std", "rank(z)", "rank(y)",
              "collapsed", "diverged at", "steps", "train s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = (r["cell"], f"`{r['settings']}`", fmt(r["knn_top1"]), fmt(r["knn_init_top1"]),
                 fmt(r["knn_gain"]), fmt(r["z_std"], 3), fmt(r["z_rank"], 1), fmt(r["y_rank"], 1),
                 fmt(r["collapsed"]), fmt(r.get("diverged_at")), fmt(r["steps"]), fmt(r["train_s"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(grid: Grid, rows: list[dict], path: Path) -> None:
    """Left: kNN top-1 per cell (lines per series for x-valued grids) against the random-init
    kNN; right: the collapse monitor z_std. Collapsed cells are drawn in red."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(9.0, 3.6), dpi=DPI, layout="constrained")
        ax_knn, ax_std = fig.subplots(1, 2)
        chance = [r["knn_init_top1"] for r in rows if r["knn_init_top1"] is not None]
        lined = all(r.get("series") and r.get("x") is not None for r in rows)
        if lined:
            for metric, ax in (("knn_top1", ax_knn), ("z_std", ax_std)):
                for series in dict.fromkeys(r["series"] for r in rows):
                    pts = sorted((r["x"], r[metric]) for r in rows
                                 if r["series"] == series and r[metric] is not None)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=series)
                ax.set_xlabel(grid.x_label)
                if grid.name == "batch":
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(sorted({r["x"] for r in rows}), [f"{r:g}" for r in sorted({r['x'] for r in rows})])
            ax_knn.legend(loc="best")
        else:
            x = np.arange(len(rows))
            colours = [RED if r["collapsed"] else BLUE for r in rows]
            ax_knn.bar(x, [r["knn_top1"] or 0 for r in rows], color=colours)
            ax_std.bar(x, [r["z_std"] or 0 for r in rows], color=colours)
            for ax in (ax_knn, ax_std):
                ax.set_xticks(x, [r["cell"] for r in rows], rotation=35, ha="right")
        if chance:
            ax_knn.axhline(float(np.mean(chance)), color=GREY, ls="--", lw=1,
                           label="random init (mean)")
            ax_knn.legend(loc="best")
        ax_knn.set_ylabel("kNN top-1 (%)")
        ax_knn.set_title(f"{grid.name}: held-out kNN accuracy")
        ax_std.set_ylabel("z_std (collapse: -> 0)")
        ax_std.set_title("collapse monitor at the end")
        save_figure(fig, path)


def write_outputs(grid: Grid, rows: list[dict], out: Path, record: dict) -> dict:
    """results.csv, results.md and results.png under ``out``; returns their paths."""
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "results.png"}
    write_csv(rows, paths["csv"])
    plot(grid, rows, paths["png"])
    overrides = " ".join(f"{k}={v}" for k, v in record.get("overrides", {}).items())
    text = [
        f"# byol sweep {grid.name}", "",
        f"Varies {grid.question}. Paper: {grid.paper}", "",
        f"Command: `byol sweep {grid.name}{' ' + overrides if overrides else ''}`; "
        f"{len(rows)}/{len(grid.cells)} cells finished; wall time {record.get('wall_s', 0) / 60:.1f} min.",
        "", markdown_table(rows), "", f"![{grid.name}](results.png)", "",
    ]
    paths["md"].write_text("\n".join(text))
    return paths
