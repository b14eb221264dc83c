"""Image files: a cheap structural check and a decoder to uint8 RGB tensors.

``check_file`` reads a few bytes only (magic bytes + end marker, no decode), so it can run over a
million files; ``decode_image`` uses torchvision.io where it can and PIL otherwise.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torchvision.io
from PIL import Image

from byol.data.errors import DataError

# torchvision.io decodes JPEG/PNG/WEBP natively; these go straight to PIL instead of raising first.
_PIL_ONLY_EXTENSIONS = (".bmp", ".tif", ".tiff")
# A JPEG or PNG may carry a little padding after its end marker; look this far back for it.
_TAIL_BYTES = 1024
_HEAD_BYTES = 16


def _header_kind(head: bytes) -> str | None:
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


def check_file(path: str | os.PathLike) -> str | None:
    """Cheap structural check: None when ``path`` looks like a valid image, else a short reason.

    Reads only the first 16 and the last 1 KiB bytes (no decode), so it is fast enough for a
    million files; it catches empty files, non-images and the common truncated download
    (JPEG without its FFD9 end-of-image marker, PNG without its IEND chunk). A file that passes
    can still fail to decode; ImageFolderDataset handles that at load time.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return "empty file"
        head = f.read(_HEAD_BYTES)
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read(_TAIL_BYTES)
    kind = _header_kind(head)
    if kind is None:
        return "not an image (unrecognised header)"
    # Searching the whole last KiB (not just the last 2 bytes) tolerates zero/whitespace
    # padding after the marker; FFD9 cannot occur inside entropy-coded data (FF is stuffed).
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


def _decode_pil(path: str | os.PathLike) -> torch.Tensor:
    with Image.open(path) as im:
        # convert("RGB") maps L, LA, P, RGBA, CMYK, ... to 3 channels (alpha is dropped,
        # as torchvision's ImageReadMode.RGB does).
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor [3, H, W].

    torchvision.io for JPEG/PNG/WEBP (the fast path); PIL for BMP/TIFF and whenever
    torchvision.io raises. Raises DataError naming the file when both decoders fail.
    """
    errors: list[str] = []
    if not str(path).lower().endswith(_PIL_ONLY_EXTENSIONS):
        try:
            data = torchvision.io.read_file(str(path))
            img = torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB)
            return _to_rgb_uint8(img)
        except (RuntimeError, ValueError, OSError) as e:
            errors.append(str(e).strip() or type(e).__name__)
    try:
        return _decode_pil(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        errors.append(str(e).strip() or type(e).__name__)
    raise DataError(f"cannot decode image {path}: {errors[-1]}")
