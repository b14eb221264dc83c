"""What an image file declares, read without decoding it: its format and its size.

``read_header`` names the format from the magic bytes and reads the size from the header: parsed
here for PNG, JPEG, WEBP, BMP and TIFF, and by a lazy ``PIL.Image.open`` (header only) otherwise.
``pixel_limit_reason`` holds that size to ``max_pixels`` (``data.max_pixels``): a PNG of a few
KiB can declare 20000 x 20000 pixels and decode to gigabytes, so the checker and the decoder
(``byol.data.decode``) refuse such an image before anything is decoded. For the headers left to
PIL, PIL's own bomb check (``Image.MAX_IMAGE_PIXELS``) is raised to ``max_pixels`` when it is
lower (and switched off when ``max_pixels`` is None), so that PIL neither refuses nor warns about
an image this limit lets through; that setting is process-wide and is never lowered here.

Files are opened without blocking and must be regular files (``open_regular``): a named pipe
called ``x.jpg`` is refused instead of blocking the reader forever.
"""
from __future__ import annotations

import os
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image

from byol.data.errors import DataError

# data.max_pixels's default: above a 200-megapixel phone photo, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 250_000_000
# Enough for the size fields of PNG (IHDR), WEBP (VP8/VP8L/VP8X) and BMP.
HEAD_BYTES = 32
# Walk at most this many JPEG segments (or TIFF IFD entries) looking for the size.
_MAX_SEGMENTS = 1024
# What PIL raises on malformed files (its plugins are not uniform: a TIFF without its size
# raises TypeError, a bad table KeyError or IndexError); any of them means the file is unusable.
# The only PIL plugins that may open a file: the formats the folder scan takes. Others (EPS, which
# runs Ghostscript; PSD; ...) never see a file, whatever its name or content.
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
Image.init()  # registers every plugin, so each of PIL_FORMATS can be asked for by name
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, KeyError, IndexError,
              struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageHeader:
    """What ``read_header`` learns without decoding: the format, the size (of one frame) and
    whether only PIL should decode it: a WEBP with EXIF data (torchvision.io ignores its
    orientation) or with animation (torchvision.io refuses it; PIL decodes the first frame)."""

    kind: str | None  # jpeg, png, webp, bmp, tiff; None: unrecognised magic bytes
    width: int
    height: int
    needs_pil: bool = False


def header_kind(head: bytes) -> str | None:
    """Image format named by the magic bytes at the start of a file, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    return None


def _nonblocking_open(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading; DataError when it is not a regular file.

    O_NONBLOCK makes opening a named pipe return at once (a plain open waits for a writer
    forever); a regular file reads the same either way.
    """
    f = open(path, "rb", opener=_nonblocking_open)
    try:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(not_regular_reason(mode))
    except BaseException:
        f.close()
        raise
    return f


def not_regular_reason(mode: int) -> str:
    """Why a file of this ``st_mode`` is refused: not a regular file, and what it is if known."""
    if stat.S_ISDIR(mode):
        return "not a regular file (a folder)"
    if stat.S_ISFIFO(mode):
        return "not a regular file (a named pipe)"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device)"
    return "not a regular file"


def os_reason(error: OSError) -> str:
    """The short reason given for a file that cannot be opened or read."""
    return f"cannot read file: {error.strerror or error}"


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, or None."""
    f.seek(2)
    for _ in range(_MAX_SEGMENTS):
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        m = marker[0]
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            continue
        if m in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if length < 2:
            return None
        # SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC), which share the range.
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            frame = f.read(5)
            if len(frame) < 5:
                return None
            _, height, width = struct.unpack(">BHH", frame)
            return (width, height) if width and height else None
        f.seek(length - 2, os.SEEK_CUR)
    return None


def _tiff_size(f: BinaryIO, head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first image file directory, or None."""
    order = "<" if head.startswith(b"II") else ">"
    f.seek(struct.unpack(order + "I", head[4:8])[0])
    count_bytes = f.read(2)
    if len(count_bytes) < 2:
        return None
    count = min(struct.unpack(order + "H", count_bytes)[0], _MAX_SEGMENTS)
    entries = f.read(12 * count)
    size: dict[int, int] = {}
    for k in range(len(entries) // 12):
        tag, kind, _ = struct.unpack(order + "HHI", entries[12 * k : 12 * k + 8])
        value = entries[12 * k + 8 : 12 * k + 12]
        if tag in (256, 257) and kind in (3, 4):  # ImageWidth, ImageLength as SHORT or LONG
            fmt, n = ("H", 2) if kind == 3 else ("I", 4)
            size[tag] = struct.unpack(order + fmt, value[:n])[0]
    return (size[256], size[257]) if size.get(256) and size.get(257) else None


def _parse_size(f: BinaryIO, kind: str, head: bytes) -> tuple[tuple[int, int] | None, bool]:
    """((width, height) or None, needs_pil) read from the header of a file of ``kind``."""
    if kind == "png":
        if head[12:16] == b"IHDR" and len(head) >= 24:
            return struct.unpack(">II", head[16:24]), False
        return None, False
    if kind == "webp":
        chunk = head[12:16]
        if chunk == b"VP8X" and len(head) >= 30:
            width = 1 + int.from_bytes(head[24:27], "little")
            height = 1 + int.from_bytes(head[27:30], "little")
            # Flags: bit 3, an EXIF chunk follows; bit 1, an animation.
            return (width, height), bool(head[20] & 0x0A)
        if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
            bits = int.from_bytes(head[21:25], "little")
            return ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1), False
        if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
            width = int.from_bytes(head[26:28], "little") & 0x3FFF
            height = int.from_bytes(head[28:30], "little") & 0x3FFF
            return ((width, height) if width and height else None), False
        return None, False
    if kind == "bmp":
        if len(head) < 26:
            return None, False
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit fields
            return struct.unpack("<HH", head[18:22]), False
        width, height = struct.unpack("<ii", head[18:26])
        return ((abs(width), abs(height)) if width and height else None), False  # < 0: top-down
    if kind == "jpeg":
        return _jpeg_size(f), False
    if kind == "tiff":
        return _tiff_size(f, head), False
    return None, False


def allow_pil_pixels(max_pixels: int | None) -> None:
    """Make PIL's bomb check no stricter than ``max_pixels``: raise ``Image.MAX_IMAGE_PIXELS`` to it
    (PIL warns above that value and refuses above twice it), or switch it off for None. Never
    lowers it."""
    if Image.MAX_IMAGE_PIXELS is None:
        return
    if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
    elif Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def pil_why(error: Exception) -> str:
    """The short reason given for one of ``PIL_ERRORS``."""
    if isinstance(error, Image.UnidentifiedImageError):  # its text names the file object
        return "PIL cannot identify the image"
    return str(error).strip() or type(error).__name__


def _pil_size(f: BinaryIO, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) by a lazy PIL open (header only), for headers not parsed here."""
    allow_pil_pixels(max_pixels)
    f.seek(0)
    try:
        with warnings.catch_warnings():
            # Above max_pixels PIL warns; the caller refuses such an image with its own reason.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f, formats=PIL_FORMATS) as im:
                return im.size
    except Image.DecompressionBombError as e:  # more than twice max_pixels
        raise DataError(f"image exceeds data.max_pixels={max_pixels} ({e})") from None
    except PIL_ERRORS as e:
        raise DataError(f"cannot read the image size: {pil_why(e)}") from None


def read_header_from(f: BinaryIO, max_pixels: int | None) -> ImageHeader:
    """The header of the open file ``f``; DataError when its size cannot be read."""
    f.seek(0)
    head = f.read(HEAD_BYTES)
    kind = header_kind(head)
    try:
        size, needs_pil = _parse_size(f, kind, head) if kind is not None else (None, False)
    except struct.error:  # a header cut short: let PIL try (and name the problem)
        size, needs_pil = None, False
    if size is None:
        size = _pil_size(f, max_pixels)
    return ImageHeader(kind, int(size[0]), int(size[1]), needs_pil)


def read_header(path: str | os.PathLike,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The format and size of the image at ``path`` from its header alone (nothing is decoded).

    Raises DataError with a short reason when ``path`` is not a regular file or its size cannot be
    read. ``max_pixels`` only matters for headers left to PIL (its bomb check is raised to it).
    """
    try:
        with open_regular(path) as f:
            return read_header_from(f, max_pixels)
    except OSError as e:
        raise DataError(os_reason(e)) from None


def pixel_limit_reason(header: ImageHeader, max_pixels: int | None) -> str | None:
    """Why an image of this size is refused (more than ``max_pixels`` pixels), or None."""
    pixels = header.width * header.height
    if max_pixels is not None and pixels > max_pixels:
        return (f"{header.width} x {header.height} = {pixels} pixels exceeds "
                f"data.max_pixels={max_pixels}")
    return None
