"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot and no global state: each figure is a ``Figure`` with its own ``FigureCanvasAgg``,
styled inside ``matplotlib.rc_context`` and written as a 7 x 3.5 in PNG at 120 dpi (840 x 420 px,
a README-sized image). Every plot function returns None when it wrote its file, or the reason it
did not (the data it needs is not in the run), which summary.md shows.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from byol.report.rundata import RunData

FIGSIZE = (7.0, 3.5)  # inches
DPI = 120
STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "axes.spines.right": False, "axes.spines.top": False,
    "legend.framealpha": 0.9, "legend.edgecolor": "0.85", "lines.linewidth": 1.6,
}
BLUE, ORANGE, GREEN, RED, PURPLE, GREY = "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "0.45"


def save_figure(fig: Figure, path: Path) -> None:
    """Render ``fig`` on an Agg canvas and write it to ``path`` as a PNG at ``DPI``."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def _axes(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _style(n: int) -> dict:
    """Markers on sparse series (a few monitor points), plain lines on dense ones."""
    return {"marker": "o", "markersize": 4} if n <= 30 else {}


def _finish(ax, run: RunData, title: str, ylabel: str, *, legend: str | None = "best",
            mark_collapse: bool = True) -> None:
    """Title, labels, the step axis (to just past the last step) with epochs on top, the
    collapse mark and the legend (``legend``: a location, "outside" the axes, or None)."""
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    right = run.last_step * 1.02
    ax.set_xlim(0, right)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    at = run.collapsed_at
    if mark_collapse and at is not None:
        ax.axvspan(at, right, color=RED, alpha=0.08, lw=0)
        ax.axvline(at, color=RED, lw=1, ls=":", label=f"collapsed at step {at}")
    spe = run.steps_per_epoch
    if spe:  # epochs on top: the schedules and monitors are set in epochs, the log in steps
        top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
        top.set_xlabel("epoch", fontsize=8)
        top.tick_params(labelsize=7)
        top.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    if legend and ax.get_legend_handles_labels()[0]:
        if legend == "outside":  # many entries: beside the axes, never over the curves
            ax.figure.legend(*ax.get_legend_handles_labels(), loc="outside right upper")
        else:
            ax.legend(loc=legend)


def smooth(values: list[float]) -> np.ndarray | None:
    """Centred moving average over ~5% of the points (shorter at the ends); None when that
    window is under 3 points, i.e. too few logs for smoothing to help."""
    half = len(values) // 40
    if half < 1:
        return None
    kernel = np.ones(2 * half + 1)
    v = np.asarray(values, dtype=float)
    return np.convolve(v, kernel, "same") / np.convolve(np.ones_like(v), kernel, "same")


def plot_loss(run: RunData, path: Path) -> str | None:
    """BYOL loss per logged step: raw (faint) under its moving average; log y over a decade."""
    steps, loss = run.series("loss")
    if not steps:
        return "no finite loss values in metrics.jsonl"
    fig, (ax,) = _axes()
    smoothed = smooth(loss)
    if smoothed is None:
        ax.plot(steps, loss, color=BLUE, **_style(len(steps)))
    else:
        ax.plot(steps, loss, color=BLUE, alpha=0.3, lw=0.8, label="logged")
        ax.plot(steps, smoothed, color=BLUE, lw=2, label=f"moving average ({2 * (len(loss) // 40) + 1} logs)")
    if min(loss) > 0 and max(loss) / min(loss) >= 10:
        ax.set_yscale("log")
    _finish(ax, run, "Training loss", "loss (2 − 2cos, summed over both views)")
    save_figure(fig, path)
    return None


def plot_schedules(run: RunData, path: Path) -> str | None:
    """Learning rate and target EMA rate tau against the step (docs/method.md §4), one panel each."""
    panels = [(key, *run.series(key)) for key in ("lr", "tau")]
    panels = [p for p in panels if p[1]]
    if not panels:
        return "no lr or tau values in metrics.jsonl"
    fig, axes = _axes(len(panels))
    for ax, (key, steps, values) in zip(axes, panels):
        if key == "lr":
            ax.plot(steps, values, color=ORANGE, **_style(len(steps)))
            ax.set_ylim(bottom=0)
            _finish(ax, run, "Learning rate (warm-up + cosine)", "learning rate", mark_collapse=False)
        else:
            ax.axhline(1.0, color=GREY, lw=0.8, ls="--")  # where tau ends (cosine schedule)
            ax.plot(steps, values, color=PURPLE, **_style(len(steps)))
            ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
            _finish(ax, run, "Target EMA rate τ", "τ", legend=None, mark_collapse=False)
    save_figure(fig, path)
    return None


def plot_collapse(run: RunData, path: Path) -> str | None:
    """z_std (normalised projection std x sqrt(d): ~1 healthy, 0 collapsed) against the healthy
    level and the collapse threshold; effective ranks of z and y beside it when logged."""
    steps, z_std = run.series("z_std")
    ranks = [(key, *run.series(key)) for key in ("z_rank", "y_rank")]
    ranks = [r for r in ranks if r[1]]
    if not steps and not ranks:
        return "no z_std or effective-rank values in metrics.jsonl"
    fig, axes = _axes(int(bool(steps)) + int(bool(ranks)))
    if steps:
        ax = axes[0]
        ax.axhline(1.0, color=GREEN, lw=1, ls="--", label="healthy ≈ 1")
        ax.axhline(run.collapse_threshold, color=RED, lw=1, ls="--",
                   label=f"collapse threshold {run.collapse_threshold:g}")
        ax.plot(steps, z_std, color=BLUE, label="z_std", **_style(len(steps)))
        ax.set_ylim(0, max(1.15, max(z_std) * 1.1))
        _finish(ax, run, "Projection spread (z_std)", "std of z/‖z‖ × √d")
    if ranks:
        ax = axes[-1]
        for (key, rsteps, values), color in zip(ranks, (BLUE, ORANGE)):
            what = "projection z" if key == "z_rank" else "representation y"
            ax.plot(rsteps, values, color=color, label=what, **_style(len(rsteps)))
        ax.set_ylim(0, max(max(r[2]) for r in ranks) * 1.15)
        _finish(ax, run, "Effective rank of a batch", "effective rank")
    save_figure(fig, path)
    return None


def plot_accuracy(run: RunData, path: Path) -> str | None:
    """Held-out kNN and online-linear top-1 (monitor rows), the online classifier's running
    accuracy on training batches, and the kNN at random init / at the end as reference lines."""
    series = [
        (run.series("val_knn_top1", run.monitor_rows), "kNN, held out", BLUE, "o"),
        (run.series("val_online_linear_top1", run.monitor_rows), "online linear, held out", ORANGE, "s"),
    ]
    train = run.series("online_linear_top1")
    if not any(s[0][0] for s in series) and not train[0]:
        return "no kNN or online-linear accuracy in metrics.jsonl"
    fig, (ax,) = _axes()
    if train[0]:
        ax.plot(*train, color=ORANGE, alpha=0.55, lw=1, label="online linear, training batches")
    for (steps, values), label, color, marker in series:
        if steps:
            ax.plot(steps, values, color=color, marker=marker, markersize=5, label=label)
    for name, label, color, ls in (("knn_init", "kNN at random init", GREY, ":"),
                                   ("knn", "final kNN", BLUE, "--")):
        if name in run.evals and isinstance(run.evals[name].get("top1"), (int, float)):
            top1 = run.evals[name]["top1"]
            ax.axhline(top1, color=color, lw=1, ls=ls, label=f"{label}: {top1:.1f}%")
    ax.set_ylim(0, min(100, ax.get_ylim()[1] * 1.1))  # 0-based: accuracies compare by ratio
    _finish(ax, run, "Top-1 accuracy", "top-1 accuracy (%)", legend="outside")
    save_figure(fig, path)
    return None


PLOTS: list[tuple[str, Callable[[RunData, Path], str | None]]] = [
    ("loss.png", plot_loss), ("schedules.png", plot_schedules),
    ("collapse.png", plot_collapse), ("accuracy.png", plot_accuracy),
]


def draw_all(run: RunData, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Write every plot the run has data for: (paths written, {file name: why it was skipped})."""
    written, skipped = [], {}
    with matplotlib.rc_context(STYLE):
        for name, plot in PLOTS:
            reason = plot(run, out_dir / name)
            if reason is None:
                written.append(out_dir / name)
            else:
                skipped[name] = reason
    return written, skipped
