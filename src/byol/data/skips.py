"""Bad samples skipped while loading, collected from every process that loads them.

A dataset records a sample it skips in its ``skipped`` list. Inside a DataLoader worker that list
is the worker's own copy and never reaches the main process, so once ``share_skips(folder)`` has
been called (in the main process, before the loader starts its workers) every process also
appends each record, as one JSON line, to a file of its own in ``folder``; ``collect_skipped`` in
the main process returns its own records and the workers', each once. A run keeps the folder in
its directory (``.skipped/``) until it has written them to ``skipped_files.tsv``
(``write_skipped``, which a resume merges into).
Files rather than a queue: a worker never blocks on a reader, the records of a killed run are
still there for its resume, and a worker started with ``spawn`` needs only the folder's name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch.utils.data import get_worker_info

from byol.files import atomic_path

Record = tuple[str, str]  # (file, or SHARD:MEMBER, reason)


class SkipRecords:
    """Mixin of the image datasets: ``skipped`` records, shared across loader workers."""

    skipped: list[Record]
    _skip_dir: str | None = None

    def share_skips(self, folder: str | os.PathLike) -> None:
        """From now on, loader workers also write their records into ``folder`` (made here)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._skip_dir = str(folder)

    def _note_skip(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))
        if self._skip_dir is not None:  # the main process too: its records then outlive a kill -9
            who = "worker" if get_worker_info() is not None else "main"
            line = json.dumps([where, reason]) + "\n"
            with open(os.path.join(self._skip_dir, f"{who}-{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
                f.write(line)  # one write of one line: a kill leaves at most a torn last line

    def collect_skipped(self) -> list[Record]:
        """This process's records and those of every worker so far, each once."""
        return unique([*self.skipped, *read_shared(self._skip_dir)])


def read_shared(folder: str | os.PathLike | None) -> list[Record]:
    """The records the workers wrote into ``folder`` and its subfolders (a torn last line is
    dropped)."""
    out: list[Record] = []
    if folder is None or not Path(folder).is_dir():
        return out
    for path in sorted(Path(folder).rglob("*.jsonl")):  # rankK/ too: other ranks' folders
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                where, reason = json.loads(line)
            except (ValueError, TypeError):
                continue
            out.append((str(where), str(reason)))
    return out


def _one_field(x: object) -> str:
    """A record's field as skipped_files.tsv holds it: no tab, no line break."""
    return " ".join(str(x).replace("\t", " ").splitlines())


def unique(records) -> list[Record]:
    """``records`` without repeats (a bad file met by several workers, or in several epochs, or
    already in skipped_files.tsv), each field as the file holds it."""
    return list(dict.fromkeys((_one_field(w), _one_field(r)) for w, r in records))


def read_skipped(path: str | os.PathLike) -> list[Record]:
    """The records of a ``skipped_files.tsv`` (none when it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = (line.split("\t", 1) for line in p.read_text(encoding="utf-8", errors="surrogateescape").splitlines())
    return [(r[0], r[1]) for r in rows if len(r) == 2]


def write_skipped(skipped, path: str | os.PathLike) -> list[Record]:
    """Write ``path<TAB>reason`` lines (one per skipped file, each once) to ``path``, e.g. in a run
    dir; -> the records written. A file name that is not UTF-8 keeps its bytes (as Python's file
    system encoding carries them)."""
    records = unique(skipped)
    text = "".join(f"{w}\t{r}\n" for w, r in records)
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8", "surrogateescape"))
    return records
