"""WebDataset-style tar shards as a map-style dataset, read with the standard library's ``tarfile``.

``data.path`` names shards when it is a brace pattern (``shards/train-{000000..000099}.tar``),
one ``.tar`` file, or a folder holding ``.tar`` files directly (``byol shard`` writes one, with a
``manifest.json``). A sample is the members of one tar that share a key (the member name up to
the first dot of its base name): ``KEY.jpg`` (or .jpeg/.png/.bmp/.webp/.tif/.tiff) and, when
labelled, ``KEY.cls`` (the class index as text); the manifest beside the shards names the classes.

Opening reads the tar headers only (and the few bytes of each ``.cls``), then every image is one
seek and one read of its bytes: a map-style dataset, so the sampler, the per-sample seeded views,
the held-out split and the exact resume of the folder path apply unchanged. What streaming
buys -- reading shards mostly sequentially -- comes from the order (``shard_order``): per epoch a
seeded permutation of the shards, streamed through a seeded bounded shuffle buffer, so the
samples a stretch of steps reads come from a few shards only (docs/architecture.md).
"""
from __future__ import annotations

import os
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from byol.data.decode import _TAIL_BYTES, trailer_reason
from byol.data.decode import decode_bytes as _decode_bytes
from byol.data.errors import DataError
from byol.data.folder import _limit_indices, _validate_args
from byol.data.headers import DEFAULT_MAX_PIXELS, HEAD_BYTES, header_kind
from byol.data.seeded import SeededSamples
from byol.data.shard_index import Row, checked_index, content_reason, listed_shards, walk_tar
from byol.data.skips import SkipRecords

MANIFEST = "manifest.json"
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_OPEN_SHARDS = 8  # file handles a process keeps open (the order touches a few shards at a time)


def is_shard_path(path: str | os.PathLike) -> bool:
    """Whether ``data.path`` names tar shards (a brace pattern, a ``.tar``, a folder of ``.tar``)."""
    text = str(path)
    if _BRACE.search(text) or text.endswith(".tar"):
        return True
    p = Path(text)
    return p.is_dir() and ((p / MANIFEST).is_file() or any(p.glob("*.tar")))


def expand_shards(path: str | os.PathLike) -> list[Path]:
    """The shard files ``path`` names, in order; DataError naming the first missing one."""
    text = str(path)
    m = _BRACE.search(text)
    if m:
        lo, hi = m.group(1), m.group(2)
        if int(hi) < int(lo):
            raise DataError(f"data.path: empty shard range {{{lo}..{hi}}} in {text}")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        files = [Path(text[:m.start()] + f"{k:0{width}d}" + text[m.end():]) for k in range(int(lo), int(hi) + 1)]
    elif Path(text).is_dir():  # the shards present; those the manifest lists are checked by the reader
        files = sorted(Path(text).glob("*.tar"))
        if not files and not (Path(text) / MANIFEST).is_file():
            raise DataError(f"data.path: no .tar shards in folder {text}")
    else:
        files = [Path(text)]
    for f in files:
        if not f.is_file():
            raise DataError(f"data.path: shard not found: {f}")
    return files


def read_manifest(folder: Path) -> object:
    """The parsed manifest.json beside the shards (None when there is none); what it holds is
    checked by ``shard_index.listed_shards``."""
    import json

    p = folder / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"data.path: cannot read shard manifest {p}: {e}") from None


def check_bytes(data: bytes) -> str | None:
    """``check_file`` on an image's bytes: None when they look like a whole image, else why."""
    if not data:
        return "empty file"
    return trailer_reason(header_kind(data[:HEAD_BYTES]), data[-_TAIL_BYTES:])


def decode_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """A tar member's bytes -> uint8 RGB [3, H, W]: ``check_bytes``, then decoded as a file is
    (``data.decode.decode_bytes``); DataError with the reason."""
    reason = check_bytes(data)
    if reason is not None:
        raise DataError(reason)
    return _decode_bytes(data, max_pixels)


class ShardDataset(SkipRecords, torch.utils.data.Dataset):
    """The images of tar shards as ``(uint8 [3, H, W], label)``; label -1 when unlabelled.

    ``labels`` (None unless every sample has a ``.cls``), ``classes`` (from the manifest, else
    ``"0".."C-1"``), ``shard_of[i]`` (the shard index of sample i), ``skipped`` (``(shard:member,
    reason)``) as ``ImageFolderDataset`` has them. Bad samples follow ``bad_files``: found at
    opening (no image member, a ``.cls`` that is not an integer, an unreadable tar; with
    ``verify="full"`` every image is decoded too) or at loading (an image that does not decode:
    skip takes the next decodable sample, recorded in that process's ``skipped`` and, after
    ``share_skips``, collected from loader workers by ``collect_skipped``); ``"fail"``
    raises DataError naming shard and member.
    """

    def __init__(self, path: str | os.PathLike, *, bad_files: str = "skip", verify: str = "quick",
                 limit: int | None = None, seed: int = 0,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        _validate_args(bad_files, verify, limit, max_pixels)
        self.path, self.bad_files, self.max_pixels = str(path), bad_files, max_pixels
        self.shards = expand_shards(path)
        self.skipped: list[tuple[str, str]] = []
        self._files: dict[int, object] = {}  # shard -> open file, per process
        self._pid = os.getpid()
        self._bad_at_load: set[int] = set()
        folder = Path(path) if Path(self.path).is_dir() else self.shards[0].parent
        manifest = read_manifest(folder)
        listed, self.manifest_note = listed_shards(manifest)
        self._check_listed_shards(folder, listed or {})
        samples, cls = self._index_all(listed or {}, seed)
        self.found = len(samples)
        keep = _limit_indices(len(samples), limit, seed)
        samples, cls = [samples[i] for i in keep], [cls[i] for i in keep]
        if verify == "full":  # the shards this run reads (data.limit: only those), then every image
            self._check_contents(listed or {}, sorted({smp[0] for smp in samples}))
            good = [i for i, smp in enumerate(samples) if self._full_check(smp)]
            samples, cls = [samples[i] for i in good], [cls[i] for i in good]
        samples, cls = self._drop_unlabelled(samples, cls)
        if not samples:
            raise DataError(f"data.path: no usable images in the shards {self.path}"
                            f" ({len(self.skipped)} samples skipped as bad)")
        self.samples = samples
        self.shard_of = [smp[0] for smp in samples]
        labelled = bool(cls) and cls[0] is not None
        self.labels: list[int] | None = [int(c) for c in cls] if labelled else None
        names = [str(c) for c in manifest.get("classes") or []] if listed and isinstance(
            manifest.get("classes"), list) else []
        if labelled and not names:
            names = [str(c) for c in range(max(self.labels) + 1)]
        self.classes: list[str] = names if labelled else []

    def _index_all(self, listed: dict[str, dict], seed: int) -> tuple[list[tuple[int, str, int, int]], list]:
        """(shard, member, offset, size) and the label (or None) of every sample of every shard."""
        samples: list[tuple[int, str, int, int]] = []
        cls: list[int | None] = []
        for s, shard in enumerate(self.shards):
            for member, offset, size, label in self._index(shard, listed.get(shard.name), seed):
                samples.append((s, member, offset, size))
                cls.append(label)
        return samples, cls

    def _check_contents(self, listed: dict[str, dict], shards: list[int]) -> None:
        for s in shards:
            entry = listed.get(self.shards[s].name)
            why = content_reason(self.shards[s], entry) if entry is not None else ""
            if why:
                self._record_bad(str(self.shards[s]), f"disagrees with {MANIFEST}: {why} (its images are "
                                                      "each decoded: data.verify=full)")

    def _drop_unlabelled(self, samples: list, cls: list) -> tuple[list, list]:
        """In a set where some samples have a ``.cls``, the ones without are bad samples (a label
        lost in a cut tar, say): the others keep their labels."""
        if all(c is None for c in cls) or all(c is not None for c in cls):
            return samples, cls
        keep = []
        for i, (smp, c) in enumerate(zip(samples, cls)):
            if c is None:
                self._record_bad(f"{self.shards[smp[0]]}:{smp[1]}", "no .cls member, in a labelled shard set")
            else:
                keep.append(i)
        return [samples[i] for i in keep], [cls[i] for i in keep]

    def _check_listed_shards(self, folder: Path, listed: dict[str, dict]) -> None:
        """``listed_samples``: what the manifest lists for the shards ``data.path`` covers (every
        shard it lists, for a folder; None without a manifest byol reads); ``unlisted``: the shards
        read that it does not list. A listed shard missing from a folder is a bad sample of
        ``bad_files``."""
        self.manifest = folder / MANIFEST if listed else None
        self.unlisted = [p for p in self.shards if listed and p.name not in listed]
        present = {p.name for p in self.shards}
        covered = listed if Path(self.path).is_dir() else {n: e for n, e in listed.items() if n in present}
        self.listed_samples = sum(e["samples"] for e in covered.values()) if listed else None
        for name, entry in covered.items():
            if name not in present:
                self._record_bad(str(folder / name), f"missing shard: {MANIFEST} lists it with "
                                                     f"{entry['samples']} samples")

    def describe(self) -> str:
        """One line for the start summary: the samples read, against what the manifest lists."""
        n, shards = len(self), f"{len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}"
        if self.listed_samples is None:
            why = f"{MANIFEST} ignored: {self.manifest_note}" if self.manifest_note else f"no {MANIFEST}"
            return f"{n} samples in {shards} ({why}: indexed from the tar headers)"
        line = f"{n} samples in {shards}, of the {self.listed_samples} that {self.manifest} lists"
        if self.found != n:
            line += f" ({self.found} found)"
        if self.unlisted:
            line += f"; {len(self.unlisted)} shard(s) it does not list (indexed from their headers)"
        return line + (f"; {len(self.skipped)} problem(s) listed in skipped_files.tsv" if self.skipped else "")

    def _record_bad(self, where: str, reason: str) -> None:
        if self.bad_files == "fail":
            raise DataError(f"bad sample {where}: {reason} (set data.bad_files=skip to skip such samples)")
        self._note_skip(where, reason)

    def _index(self, shard: Path, entry: dict | None, seed: int) -> list[Row]:
        """The samples of ``shard``: its manifest ``entry``'s index when the tar agrees with it
        (``checked_index``), else the tar's headers, every bad member and a disagreement with
        the manifest following ``bad_files``."""
        why = ""
        if entry is not None:
            rows, why = checked_index(shard, entry, seed=seed)
            if rows is not None:
                return rows
        rows, problems = walk_tar(shard)
        for where, reason in problems:
            self._record_bad(where, reason)
        listed = entry["index"].get("names") if entry is not None else None
        if entry is not None and [r[0] for r in rows] != listed:
            count = len(listed) if isinstance(listed, list) else 0
            self._record_bad(str(shard), f"disagrees with {MANIFEST}: {why}; the tar holds {len(rows)} usable "
                                         f"samples, {MANIFEST}'s index lists {count}")
        return rows

    def _full_check(self, sample: tuple[int, str, int, int]) -> bool:
        try:
            decode_bytes(self._read(sample), self.max_pixels)
        except DataError as e:
            self._record_bad(f"{self.shards[sample[0]]}:{sample[1]}", str(e))
            return False
        return True

    def __getstate__(self) -> dict:  # worker processes open their own files
        return {**self.__dict__, "_files": {}}

    def _read(self, sample: tuple[int, str, int, int]) -> bytes:
        s, _, offset, size = sample
        if self._pid != os.getpid():  # forked: never share a file position with the parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.pop(s, None)
        if f is None:
            if len(self._files) >= _OPEN_SHARDS:
                self._files.pop(next(iter(self._files))).close()
            f = open(self.shards[s], "rb")  # noqa: SIM115 (kept open between reads)
        self._files[s] = f  # most recently used last
        f.seek(offset)
        return f.read(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        i %= n
        for j in ((i + k) % n for k in range(n)):  # deterministic fallback, as the folder's
            if j in self._bad_at_load:
                continue
            sample = self.samples[j]
            try:
                img = decode_bytes(self._read(sample), self.max_pixels)
            except DataError as e:
                self._bad_at_load.add(j)
                self._record_bad(f"{self.shards[sample[0]]}:{sample[1]}", str(e))
                continue
            return img, (self.labels[j] if self.labels is not None else -1)
        raise DataError(f"data.path: no image in the shards {self.path} could be decoded")


def shard_order(shard_of: Sequence[int], seed: int, epoch: int, buffer: int) -> list[int]:
    """The epoch's order of ``range(len(shard_of))`` (sample j lies in shard ``shard_of[j]``): the
    shards in a permutation seeded by (seed, epoch), their samples in file order streamed through a
    shuffle buffer of ``buffer`` samples drawing from the same generator. A function of (seed,
    epoch) only, so a resume at position p of an epoch continues at its p-th sample."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_shard: dict[int, list[int]] = defaultdict(list)
    for j, s in enumerate(shard_of):
        by_shard[s].append(j)
    shards = sorted(by_shard)
    rng.shuffle(shards)
    out: list[int] = []
    buf: list[int] = []
    for s in shards:
        for j in by_shard[s]:
            if len(buf) < buffer:
                buf.append(j)
                continue
            k = rng.randrange(buffer)
            out.append(buf[k])
            buf[k] = j
    rng.shuffle(buf)
    out.extend(buf)
    return out


class ShardSamples(SeededSamples):
    """``SeededSamples`` whose sampler order is ``shard_order`` (``ResumableSampler`` asks
    ``order(epoch)``): (epoch, i) -> the seeded views of sample i; ``shard_of[i]`` its shard."""

    def __init__(self, base, seed: int, shard_of: Sequence[int], buffer: int) -> None:
        super().__init__(base, seed)
        self.shard_of, self.buffer = list(shard_of), buffer
        self._order: tuple[int, list[int]] | None = None  # the last epoch's, asked for more than once

    def order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, shard_order(self.shard_of, self.seed, epoch, self.buffer))
        return self._order[1]
