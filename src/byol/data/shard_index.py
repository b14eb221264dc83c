"""The samples of one tar shard: read from its headers, or taken from the manifest once checked.

A shard's samples are rows ``(image member name, data offset, size, label or None)``. Two ways
to get them:

- ``walk_tar`` reads every tar header (the truth, at ~0.1 ms a sample). It names each bad
  member: a member whose data runs past the end of the file, bytes after the last member that
  are not a tar member (a damaged header or a cut inside one: ``tarfile`` takes either for the
  end of the archive and would drop the rest without a word), a key without an image, a label
  that is not a number.
- ``checked_index`` takes the index that ``byol shard`` wrote into ``manifest.json`` when the
  tar still is what the manifest describes, at a cost that does not grow with the shard's bytes:
  its size; the index's own counts; the layout, in which the members the index lists and the
  end-of-archive blocks account for every byte of the file (so no member is missing from the
  index, wherever it sits); and the headers of a few members. Any difference is returned as a
  reason, and the caller walks the tar. ``content_reason`` compares the whole file's sha256
  (``data.verify=full``, for the shards a run reads). A manifest of another format is not read
  (``listed_shards``).
"""
from __future__ import annotations

import random
import re
import tarfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from byol.data.scan import IMAGE_EXTENSIONS
from byol.files import sha256_file

Row = tuple[str, int, int, "int | None"]  # (image member, data offset, size, label)
Problem = tuple[str, str]  # (where: SHARD:MEMBER or SHARD, reason)

BLOCK = tarfile.BLOCKSIZE
_TAIL_CHUNK = 1 << 20  # the bytes after the last member are read in these to see they are zeros
FORMAT = "byol-shards/1"  # the manifest's format (byol shard); another is not read
_SAMPLED_HEADERS = 4  # headers read per shard: the first, the last and two seeded others


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's key and extension of a member name: ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


# --- the walk over every header --------------------------------------------------------------

def walk_tar(shard: Path) -> tuple[list[Row], list[Problem]]:
    """Every sample of ``shard`` from its headers, and every bad member with its reason."""
    groups: dict[str, dict[str, tuple[int, int, str]]] = defaultdict(dict)
    texts: dict[str, str] = {}  # key -> its .cls text
    order: list[str] = []
    problems: list[Problem] = []
    last: tarfile.TarInfo | None = None
    size = shard.stat().st_size
    try:
        with tarfile.open(shard, "r:") as tf:
            for m in tf:
                last = m
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:  # the data runs past the end of the file
                    break
                key, ext = split_key(m.name)
                if key not in groups:
                    order.append(key)
                groups[key][ext] = (m.offset_data, m.size, m.name)
                if ext == "cls":
                    texts[key] = tf.extractfile(m).read().decode("utf-8", "replace")
            end = tf.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        end = None
        if last is None or last.offset_data + last.size <= size:  # not a cut member: a bad header
            problems.append(_after(shard, last, f"unreadable tar header ({e})"))
    if last is not None and last.offset_data + last.size > size:
        key = split_key(last.name)[0]
        if key in groups:  # the sample is reported once, as cut
            del groups[key]
            order.remove(key)
        problems.append((f"{shard}:{last.name}", f"truncated member: its {last.size} bytes end "
                         f"{last.offset_data + last.size - size} bytes past the end of the tar"))
    elif end is not None:
        junk = _nonzero_tail(shard, end, size)
        if junk:
            problems.append(_after(shard, last, f"damaged or cut tar: {junk} bytes after it are not "
                                                "a tar member (a bad header, or a cut inside one)"))
        elif end == size and last is not None:  # every tar writer ends with zero blocks
            problems.append(_after(shard, last, "cut tar: it ends without the end-of-archive blocks "
                                                "(members after this point are lost)"))
    return _rows(shard, order, groups, texts, problems), problems


def _after(shard: Path, last: tarfile.TarInfo | None, reason: str) -> Problem:
    """A problem at the member after ``last`` (its name unreadable): ``SHARD:<after NAME>``."""
    where = f"<member after {last.name}>" if last is not None else "<first member>"
    return f"{shard}:{where}", reason


def _nonzero_tail(shard: Path, end: int, size: int) -> int:
    """How many bytes follow the archive's last member, when they are not only zeros (the
    end-of-archive blocks, padded to the writer's record size: 10 KiB by default, megabytes with
    ``tar -b``); 0 when they are."""
    if size <= end:
        return 0
    with open(shard, "rb") as f:
        f.seek(end)
        for chunk in iter(lambda: f.read(_TAIL_CHUNK), b""):
            if chunk.strip(b"\0"):
                return size - end
    return 0


def _rows(shard: Path, order: list[str], groups: dict, texts: dict[str, str],
          problems: list[Problem]) -> list[Row]:
    out = []
    for key in order:
        g = groups[key]
        image = next((e for e in g if f".{e}" in IMAGE_EXTENSIONS), None)
        if image is None:
            if g:
                problems.append((f"{shard}:{key}", f"no image member (has {', '.join(sorted(g))})"))
            continue
        offset, size, name = g[image]
        label = None
        if key in texts:
            text = texts[key].strip()
            if not re.fullmatch(r"\d+", text):
                problems.append((f"{shard}:{key}.cls", f"label is not a non-negative integer: {text[:20]!r}"))
                continue
            label = int(text)
        out.append((name, offset, size, label))
    return out


# --- the manifest's index, checked --------------------------------------------------------------

def listed_shards(manifest) -> tuple[dict[str, dict] | None, str]:
    """The shard entries of a manifest by name, when it is one ``byol shard`` wrote (its format,
    a list of entries each with a bare name, a sample count, a sha256 and an index); else (None,
    why it is not read). None without a manifest."""
    if manifest is None:
        return None, ""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return None, f"not written by byol shard (format {found!r}, not {FORMAT!r})"
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        return None, "its 'shards' is not a list"
    listed: dict[str, dict] = {}
    for e in entries:
        ok = (isinstance(e, dict) and isinstance(e.get("name"), str) and "/" not in e["name"]
              and isinstance(e.get("samples"), int) and e["samples"] >= 0 and isinstance(e.get("sha256"), str)
              and isinstance(e.get("index"), dict))
        if not ok:
            return None, f"a malformed shard entry: {str(e)[:80]}"
        listed[e["name"]] = e
    return listed, ""


def checked_index(shard: Path, entry: dict, *, seed: int = 0) -> tuple[list[Row] | None, str]:
    """The rows ``entry`` (the shard's record in manifest.json) lists when the tar agrees with
    it, else (None, why not). Reads the file's size, its tail and a few headers."""
    index = entry.get("index")
    if not isinstance(index, dict):
        return None, "manifest.json holds no index for it"
    names, offsets, sizes = index.get("names"), index.get("offsets"), index.get("sizes")
    labels = index.get("labels") or [None] * len(names or [])
    counts = {len(x) if isinstance(x, list) else -1 for x in (names, offsets, sizes, labels)}
    if len(counts) != 1 or entry.get("samples") != len(names):
        return None, (f"its index in manifest.json is inconsistent (samples: {entry.get('samples')}, "
                      f"{'/'.join(str(len(x)) if isinstance(x, list) else '-' for x in (names, offsets, sizes))} "
                      "names/offsets/sizes)")
    size = shard.stat().st_size
    if entry.get("bytes") != size:
        return None, f"it has {size} bytes, manifest.json says {entry.get('bytes')}"
    rows = list(zip(names, offsets, sizes, labels))
    for check in (_layout_reason, _header_reason(seed)):
        why = check(shard, rows, size)
        if why:
            return None, why
    return rows, ""


def content_reason(shard: Path, entry: dict) -> str:
    """Why the shard's bytes are not those the manifest describes (its sha256), else ''."""
    return "" if sha256_file(shard) == entry["sha256"] else "its content differs from the sha256 in manifest.json"


def _layout_reason(shard: Path, rows: list[Row], size: int) -> str:
    """Why the rows do not account for every byte of the tar in ``byol shard``'s layout (per
    sample a header, the image, and for a labelled sample a .cls header and block), else ''."""
    labelled = bool(rows) and rows[0][3] is not None
    gap = BLOCK * (3 if labelled else 1)  # after an image: [.cls header + data], next header
    expect = BLOCK
    for k, (_, offset, n, _label) in enumerate(rows):
        if offset != expect:
            return (f"manifest.json's index does not match the tar's layout at sample {k} (byte {offset}, "
                    f"expected {expect}): the tar holds members the index does not list, or lacks some")
        expect = offset + _padded(n) + gap
    end = expect - BLOCK
    if end > size:
        return f"the tar ends at byte {size}, before the last sample manifest.json lists ends ({end})"
    junk = _nonzero_tail(shard, end, size)
    return f"{junk} bytes after the last sample manifest.json lists are not the end of the archive" if junk else ""


def _header_reason(seed: int) -> Callable[[Path, list[Row], int], str]:
    def check(shard: Path, rows: list[Row], size: int) -> str:
        """Why the headers of a few sampled members disagree with the rows, else ''."""
        if not rows:
            return ""
        picks = {0, len(rows) - 1, *random.Random(seed).sample(range(len(rows)), min(2, len(rows)))}
        with open(shard, "rb") as f:
            for k in sorted(picks)[:_SAMPLED_HEADERS]:
                name, offset, n, _ = rows[k]
                f.seek(offset - BLOCK)
                try:
                    info = tarfile.TarInfo.frombuf(f.read(BLOCK), "utf-8", "surrogateescape")
                except tarfile.TarError:
                    return f"no tar header where manifest.json puts {name}"
                if (info.name, info.size) != (name, n):
                    return (f"the header before byte {offset} is {info.name} ({info.size} bytes), "
                            f"manifest.json says {name} ({n} bytes)")
        return ""
    return check
