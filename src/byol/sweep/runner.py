"""``byol sweep NAME``: run a grid's cells one after another, then write its table and plot.

Layout of ``OUT`` (default ``runs/sweep-NAME``)::

    sweep.json      the grid, the user's overrides, the accumulated wall time
    CELL/           one ordinary run directory per cell (config, metrics, checkpoints, eval)
    CELL/sweep_row.json   written when the cell has finished and been evaluated
    results.csv, results.md, results.png

Resumable: a cell with ``sweep_row.json`` is not rerun; a cell stopped part-way (Ctrl-C, a
killed job) resumes from its checkpoint exactly like ``byol pretrain --resume``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from byol.config import ConfigError, apply_overrides, config_from_dict, parse_overrides, read_yaml, resolve_config_path
from byol.config.resume import resumed_config
from byol.data.errors import DataError
from byol.sweep.grids import GRIDS, SHORT, Grid
from byol.sweep.table import fmt, result_row, write_outputs

# Keys that only say how or how far this session runs, not what a cell is: they may differ
# between the sessions of one sweep.
SESSION_KEYS = ("train.max_steps", "train.progress", "train.threads", "train.device",
                "data.num_workers")


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ConfigError(f"sweep: unknown grid {name!r} (choose from {', '.join(GRIDS)})")
    return GRIDS[name]


def cell_overrides(grid: Grid, label: str, user: list[str]) -> list[str]:
    """SHORT, then the cell's own keys, then the user's (which win)."""
    merged = {**SHORT, **grid.cell(label).overrides}
    items = [f"{k}={json.dumps(v) if isinstance(v, (bool, type(None))) else v}" for k, v in merged.items()]
    given = parse_overrides(user)
    if "data.path" in given and "data.dataset" not in given:
        items.append("data.dataset=folder")  # data.path= means "this folder instead of the demo data"
    return items + list(user)


def _check_settings(out: Path, grid: Grid, user: list[str]) -> dict:
    """The sweep's record; refuses to mix cells run with different settings in one folder."""
    path = out / "sweep.json"
    wanted = {k: v for k, v in parse_overrides(user).items() if k not in SESSION_KEYS}
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("grid") != grid.name:
            raise ConfigError(f"sweep: {out} holds the {record.get('grid')!r} grid, not {grid.name!r}; "
                              "choose another --out")
        started = any((out / c.label / "config.yaml").is_file() for c in grid.cells)
        if record.get("overrides") != wanted and started:
            raise ConfigError(f"sweep: {out} was run with overrides {record.get('overrides')}, now "
                              f"{wanted}; rerun with the same ones or choose another --out")
        return {**record, "overrides": wanted}
    return {"grid": grid.name, "overrides": wanted, "wall_s": 0.0}


def _has_checkpoint(cell_dir: Path) -> bool:
    from byol.train.checkpoint import find_checkpoint

    try:
        find_checkpoint(cell_dir)
        return True
    except (DataError, ValueError, OSError):
        return False


def run_sweep(name: str, overrides: list[str] | None = None, *, out: str | Path | None = None,
              log=print) -> dict:
    """Run (or finish) grid ``name``; returns {"rows", "interrupted", "outputs", "out"}."""
    from byol.train.guard import TrainingDiverged
    from byol.train.pretrain import pretrain

    grid, user = get_grid(name), list(overrides or [])
    out = Path(out) if out is not None else Path("runs") / f"sweep-{name}"
    record = _check_settings(out, grid, user)
    base = read_yaml(resolve_config_path("demo"))
    # Build every cell's config before running any: a bad override fails now, not in cell 4.
    configs = {c.label: config_from_dict(apply_overrides(
        base, cell_overrides(grid, c.label, user) + [f"train.out_dir={out}", f"train.name={c.label}"]))
        for c in grid.cells}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    rows, interrupted, t0 = [], False, time.time()
    for i, cell in enumerate(grid.cells, 1):
        cell_dir = out / cell.label
        done = cell_dir / "sweep_row.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            log(f"[{i}/{len(grid.cells)}] {cell.label}: done before, not rerun")
            continue
        resume = _has_checkpoint(cell_dir)
        if cell_dir.exists() and not resume:  # stopped before its first checkpoint: start over
            shutil.rmtree(cell_dir)
        log(f"[{i}/{len(grid.cells)}] {cell.label}: {'resuming' if resume else 'running'} "
            f"{' '.join(f'{k}={v}' for k, v in cell.overrides.items()) or '(the grid baseline)'}")
        if resume:
            # its own config, minus the last stop step, plus how this session runs
            session = [f"{k}={v}" for k, v in parse_overrides(user).items() if k in SESSION_KEYS]
            cell_cfg = resumed_config(cell_dir, session, allowed=SESSION_KEYS)
            resume_dir = cell_dir
        else:
            cell_cfg, resume_dir = configs[cell.label], None
        try:
            result = pretrain(cell_cfg, resume=resume_dir, stem=cell.label)
        except TrainingDiverged as e:  # an outcome of the grid (e.g. no normalisation), not a crash
            result = e.result
            log(f"  {cell.label}: diverged at step {result.diverged['step']} (non-finite "
                f"{result.diverged['what']}); recorded as such")
        record["wall_s"] += time.time() - t0
        t0 = time.time()
        (out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
        if not result.finished and result.diverged is None:
            interrupted = result.interrupted
            log(f"  {cell.label} stopped at step {result.step}; rerun the same command to continue")
            if interrupted:
                break
            continue
        row = result_row(grid, cell, cell_dir)
        done.write_text(json.dumps(row, indent=1) + "\n")
        rows.append(row)
        log(f"  {cell.label}: kNN {fmt(row['knn_top1'])} (random init {fmt(row['knn_init_top1'])}), "
            f"z_std {fmt(row['z_std'], 3)}, collapsed {fmt(row['collapsed'])}")
    outputs = write_outputs(grid, rows, out, record) if rows else {}
    return {"rows": rows, "interrupted": interrupted, "outputs": outputs, "out": out,
            "complete": len(rows) == len(grid.cells)}
