"""Image files: a cheap structural check and a decoder to uint8 RGB tensors.

``check_file`` reads a few bytes only (magic bytes, the header that holds the image size, the
end marker; no decode), so it can run over a million files; ``decode_image`` uses torchvision.io
where it can and PIL otherwise. Both read the header first (``byol.data.headers``) and refuse an
image that declares more than ``max_pixels`` pixels (``data.max_pixels``) before anything is
decoded; torchvision.io has no limit of its own, and PIL's bomb check is raised to that limit.

The decoded image is the upright one (EXIF orientation applied, by torchvision.io for JPEG and
PNG, by PIL for the rest; a WEBP with EXIF data goes to PIL, since torchvision.io ignores its
orientation). An animated WEBP goes to PIL too (torchvision.io refuses those), which decodes its
first frame. 16-bit images are scaled to 8 bits (v >> 8), not clipped; alpha is dropped; CMYK,
grayscale, palette and 1-bit images become RGB.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
import torch
import torchvision.io
from PIL import Image, ImageOps

from byol.data.errors import DataError
from byol.data.headers import (
    DEFAULT_MAX_PIXELS,
    HEAD_BYTES,
    PIL_ERRORS,
    PIL_FORMATS,
    ImageHeader,
    allow_pil_pixels,
    header_kind,
    open_regular,
    os_reason,
    pil_why,
    pixel_limit_reason,
    read_header_from,
)

# Formats (by magic bytes) that torchvision.io decodes; the others go straight to PIL. Not PNG:
# torchvision 0.29's PNG decoder crashes the process (SIGSEGV, from libpng's error exit) on a PNG
# whose compressed data is damaged, where PIL raises (tests/test_hostile_images.py).
_TORCHVISION_KINDS = ("jpeg", "webp")
# A JPEG or PNG may carry a little padding after its end marker; look this far back for it.
_TAIL_BYTES = 1024
_ORIENTATION = 0x0112  # the EXIF orientation tag
# PIL modes of 16-bit grayscale images ("I" is what PIL used to open 16-bit PNGs as).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def check_file(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Cheap structural check: None when ``path`` looks like a valid image, else a short reason.

    Reads only the first bytes, the header with the image size and the last 1 KiB (no decode),
    so it is fast enough for a million files; it catches empty files, non-images, files that
    are not regular files or cannot be read, the common truncated download (JPEG without its
    FFD9 end-of-image marker, PNG without its IEND chunk) and images of more than ``max_pixels``
    pixels (None: no limit). A file that passes can still fail to decode; ImageFolderDataset
    handles that at load time.
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return "empty file"
            head = f.read(HEAD_BYTES)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read(_TAIL_BYTES)
            kind = header_kind(head)
            if kind is None:
                return "not an image (unrecognised header)"
            truncated = trailer_reason(kind, tail)
            if truncated is not None:
                return truncated
            return pixel_limit_reason(read_header_from(f, max_pixels), max_pixels)
    except DataError as e:
        return str(e)
    except OSError as e:
        return os_reason(e)


def trailer_reason(kind: str | None, tail: bytes) -> str | None:
    """Why a file's last KiB shows it truncated (a JPEG without its end-of-image marker, a PNG
    without its IEND chunk), else None. Searching the whole last KiB (not just the last 2 bytes)
    tolerates zero/whitespace padding after the marker; FFD9 cannot occur inside entropy-coded
    data (FF is stuffed)."""
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if kind == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def _to_rgb_uint8(img: torch.Tensor) -> torch.Tensor:
    """Normalise a torchvision.io result to uint8 [3, H, W] (16-bit PNGs, animated frames)."""
    if img.ndim == 4:  # animated WEBP: keep the first frame
        img = img[0]
    if img.dtype == torch.uint16:
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise ValueError(f"unexpected decoded dtype {img.dtype}")
    return img.contiguous()


def _upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation tag says (what torchvision.io's
    apply_exif_orientation does); unchanged without a tag or with EXIF data PIL cannot read."""
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a malformed EXIF block must not make a decodable image unusable
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image of any mode."""
    im = _upright(im)
    if im.mode in _SIXTEEN_BIT_MODES:
        # convert("RGB") clips these at 255; scale them as the 16-bit PNGs of torchvision.io are.
        gray = (np.clip(np.asarray(im), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        # Palette transparency: via RGBA, as PIL asks (and warns for every image otherwise).
        return np.asarray(im.convert("RGBA"))[:, :, :3]
    # convert("RGB") maps L, LA, 1, RGBA, CMYK, 16-bit RGB (high bytes), ... to 3 channels
    # (alpha is dropped, as torchvision's ImageReadMode.RGB does).
    return np.asarray(im.convert("RGB"))


def _decode_pil(f: BinaryIO, max_pixels: int | None) -> torch.Tensor:
    allow_pil_pixels(max_pixels)
    f.seek(0)
    with Image.open(f, formats=PIL_FORMATS) as im:
        # The size PIL reads (the same header, parsed again) is held to the limit too.
        reason = pixel_limit_reason(ImageHeader(None, *im.size), max_pixels)
        if reason is not None:
            raise DataError(reason)
        arr = _pil_to_rgb(im)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()


def _decode_torchvision(f: BinaryIO) -> torch.Tensor:
    f.seek(0)
    if isinstance(f, io.BytesIO):  # the bytes of a tar member (data/shards.py)
        buf = torch.frombuffer(bytearray(f.getbuffer()), dtype=torch.uint8)
    else:
        data = bytearray(os.fstat(f.fileno()).st_size)
        n = f.readinto(data)
        buf = torch.frombuffer(data, dtype=torch.uint8)[:n]
    img = torchvision.io.decode_image(buf, mode=torchvision.io.ImageReadMode.RGB,
                                      apply_exif_orientation=True)
    return _to_rgb_uint8(img)


def _decode_stream(f: BinaryIO, max_pixels: int | None, errors: list[str]) -> torch.Tensor:
    """An open image (a file, or a tar member's bytes) -> uint8 RGB [3, H, W]: the header and the
    pixel limit first, then torchvision.io (JPEG/WEBP) and PIL (PNG/BMP/TIFF, and whenever
    torchvision.io raises). Each decoder's failure is appended to ``errors``; DataError when the
    limit refuses the image or both decoders fail."""
    header = read_header_from(f, max_pixels)
    reason = pixel_limit_reason(header, max_pixels)
    if reason is not None:
        raise DataError(reason)
    if header.kind in _TORCHVISION_KINDS and not header.needs_pil:
        try:
            return _decode_torchvision(f)
        except (RuntimeError, ValueError, OSError) as e:
            errors.append(str(e).strip() or type(e).__name__)
    try:
        return _decode_pil(f, max_pixels)
    except PIL_ERRORS as e:
        errors.append(pil_why(e))
    raise DataError(errors[-1])


def decode_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """An image file's bytes (a tar member) -> uint8 RGB [3, H, W], decoded as ``decode_image``
    decodes a file; DataError with the reason."""
    return _decode_stream(io.BytesIO(data), max_pixels, [])


def decode_image(path: str | os.PathLike,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W], upright (EXIF orientation applied).

    The header is read first and an image of more than ``max_pixels`` pixels (None: no limit)
    is refused before either decoder sees it. torchvision.io for JPEG/WEBP (the fast path);
    PIL for PNG/BMP/TIFF and whenever torchvision.io raises. Raises DataError naming the file when
    the file cannot be used or both decoders fail.
    """
    errors: list[str] = []
    try:
        with open_regular(path) as f:
            return _decode_stream(f, max_pixels, errors)
    except DataError as e:
        if not errors or errors[-1] != str(e):
            errors.append(str(e))
    except OSError as e:
        errors.append(os_reason(e))
    raise DataError(f"cannot decode image {path}: {errors[-1]}")
