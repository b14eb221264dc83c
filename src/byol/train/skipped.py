"""A run's ``skipped_files.tsv``: the samples skipped at opening, and those that the loader
processes of every rank skip while training (``byol.data.skips``), merged across sessions.

    shared = share_skips(data.source, run_dir, rt)      # before any loader starts its workers
    merge_skipped(run_dir, data.skipped)                # the opening's (rank 0)
    ...
    records = collect_skips(data.source, shared, run_dir, rt)   # at the end, on every rank
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from byol import distributed
from byol.data.skips import read_skipped, write_skipped
from byol.train.runtime import Runtime

SKIPPED = "skipped_files.tsv"
SHARED_SKIPS = ".skipped"  # the loader processes' records until they reach skipped_files.tsv


def merge_skipped(run_dir: Path, records) -> list:
    """skipped_files.tsv := its records so far (an earlier session's) + ``records``, each once
    (``write_skipped``); -> what it holds."""
    merged = [*read_skipped(run_dir / SKIPPED), *records]
    return write_skipped(merged, run_dir / SKIPPED) if merged else []


def share_skips(source, run_dir: Path, rt: Runtime) -> Path | None:
    """Where this process and its loader workers record the samples they skip (byol.data.skips):
    RUN/.skipped on rank 0, RUN/.skipped/rankK on rank K where it sees the run directory (a
    killed session's records stay there for its resume, whose rank 0 reads them all), else a
    temporary folder (a run directory on another machine)."""
    if not hasattr(source, "share_skips"):
        return None
    if rt.main:
        folder = run_dir / SHARED_SKIPS
    elif run_dir.is_dir():
        folder = run_dir / SHARED_SKIPS / f"rank{rt.rank}"
    else:
        folder = Path(tempfile.mkdtemp(prefix=f"byol-skipped-rank{rt.rank}-"))
    source.share_skips(folder)
    return folder


def collect_skips(source, shared: Path | None, run_dir: Path, rt: Runtime) -> list:
    """Every rank's skipped samples (its own and its workers'), merged into rank 0's
    skipped_files.tsv; -> the merged records (on rank 0; [] elsewhere). Every rank calls it."""
    mine = source.collect_skipped() if hasattr(source, "collect_skipped") else list(getattr(source, "skipped", []))
    everyone = [r for part in distributed.gather_objects(mine) for r in part]
    merged = merge_skipped(run_dir, everyone) if rt.main else []
    if shared is not None:
        shutil.rmtree(shared, ignore_errors=True)  # now in skipped_files.tsv
    return merged
