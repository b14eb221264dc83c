"""Procedural labelled shapes: the built-in dataset for ``byol demo`` and the tests.

Eight shape classes; the shape is the only class signal. Size, position and rotation are
random nuisances in every image. By default the shapes are white on black (``colour=False``):
that is the dataset of ``byol demo``. With ``colour=True`` the foreground colour and the
background (flat, linear gradient or low-frequency noise, random colour) vary too; that harder
variant is not what the demo uses, because in a few CPU minutes BYOL first learns the colours
(which two crops of one image share despite colour jitter) and its kNN accuracy on shapes stays
at chance (measured: docs/benchmarks.md). Nothing is read from disk.

Image ``i`` is a pure function of ``(seed, i)``: it draws from its own
``numpy.random.default_rng([seed, i])``, so it does not depend on access order or on the number
of DataLoader workers.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "heart")

# Shapes are drawn at this many times the output size, then box-downsampled: smooth,
# antialiased edges at the cost of one cheap reduce().
_SUPERSAMPLE = 4
# Diameter of the shape's enclosing circle as a fraction of the side: big enough that most
# random-resized crops (scale 0.08-1) still contain part of the shape.
_SIZE_RANGE = (0.4, 0.85)
# Minimum |luma(fg) - luma(background mean)| out of 255, so the shape stays visible, also
# after the grayscale augmentation.
_MIN_LUMA_CONTRAST = 60.0
_LUMA = np.array([0.299, 0.587, 0.114])
# Background variation amplitude (per channel, out of 255) for gradient / noise backgrounds;
# small enough to keep the contrast above, large enough to be a strong nuisance.
_BG_VARIATION = 70.0
_NOISE_GRID = 4


@functools.cache
def _template(name: str) -> np.ndarray:
    """Polygon vertices [V, 2] of a shape inside the unit circle, centred on the origin."""
    if name == "square":
        return np.array([[-0.7, -0.7], [0.7, -0.7], [0.7, 0.7], [-0.7, 0.7]])
    if name == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "hexagon":
        a = np.arange(6) * np.pi / 3
        return 0.9 * np.stack([np.cos(a), np.sin(a)], 1)
    if name == "star":
        a = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if name == "cross":
        w, h = 0.3, 0.9  # arm half-width, arm half-length
        return np.array([[-w, -h], [w, -h], [w, -w], [h, -w], [h, w], [w, w],
                         [w, h], [-w, h], [-w, w], [-h, w], [-h, -w], [-w, -w]])
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
        pts -= (pts.max(0) + pts.min(0)) / 2
        return pts / np.linalg.norm(pts, axis=1).max()
    raise KeyError(name)


@functools.cache
def _bilinear_weights(size: int, grid: int) -> np.ndarray:
    """[size, grid] weights that bilinearly upsample ``grid`` control points to ``size`` pixels."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(grid)[None, :]))


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Background [size, size, 3] float in 0..255 and its mean colour [3].

    Half flat; a quarter linear gradient in a random direction; a quarter low-frequency colour
    noise (a 4x4 grid of random offsets, bilinearly upsampled).
    """
    base = rng.uniform(0, 255, 3)
    kind = rng.integers(4)
    if kind < 2:
        bg = np.broadcast_to(base, (size, size, 3)).astype(np.float64)
    elif kind == 2:
        angle = rng.uniform(0, 2 * np.pi)
        coords = (np.arange(size) + 0.5) / size - 0.5
        t = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # [H, W] in ±0.71
        delta = rng.uniform(-1, 1, 3) * 2 * _BG_VARIATION
        bg = base + t[:, :, None] * delta
    else:
        w = _bilinear_weights(size, _NOISE_GRID)
        offsets = rng.uniform(-1, 1, (_NOISE_GRID, _NOISE_GRID, 3)) * _BG_VARIATION
        bg = base + np.einsum("hk,klc,wl->hwc", w, offsets, w)
    bg = np.clip(bg, 0, 255)
    return bg, bg.mean((0, 1))


def _foreground(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
    """A random RGB colour [3] whose luma differs from the background's by the minimum contrast."""
    candidates = rng.uniform(0, 255, (16, 3))
    ok = np.abs(candidates @ _LUMA - bg_mean @ _LUMA) >= _MIN_LUMA_CONTRAST
    if ok.any():
        return candidates[np.argmax(ok)]
    # Rare: fall back to whichever of black/white is farther from the background.
    return np.full(3, 0.0 if bg_mean @ _LUMA > 127.5 else 255.0)


def _mask(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """Antialiased coverage [size, size] float in 0..1 of a randomly placed shape."""
    big = size * _SUPERSAMPLE
    radius = rng.uniform(*_SIZE_RANGE) * big / 2
    # Centre so that at most ~15% of the radius may fall outside the image.
    margin = 0.85 * radius
    cx, cy = rng.uniform(margin, big - margin, 2)
    angle = rng.uniform(0, 2 * np.pi)  # drawn for every shape to keep the rng stream uniform
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    if name in ("circle", "ring"):
        r = 0.85 * radius if name == "circle" else 0.95 * radius
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if name == "ring":
            r *= 0.55
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
    else:
        c, s = np.cos(angle), np.sin(angle)
        pts = _template(name) @ np.array([[c, s], [-s, c]]) * radius + (cx, cy)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(img.reduce(_SUPERSAMPLE), dtype=np.float64) / 255.0


def render(i: int, *, image_size: int = 32, seed: int = 0, colour: bool = False) -> np.ndarray:
    """Image ``i`` of the dataset with ``seed``: uint8 [image_size, image_size, 3], class i % 8."""
    rng = np.random.default_rng([seed, i])
    if colour:
        bg, bg_mean = _background(rng, image_size)
        fg = _foreground(rng, bg_mean)
    else:
        bg, fg = np.zeros((image_size, image_size, 3)), np.full(3, 255.0)
    alpha = _mask(rng, CLASSES[i % len(CLASSES)], image_size)[:, :, None]
    out = bg * (1.0 - alpha) + fg * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` procedural shape images as ``(sample, label)``; balanced labels ``i % 8``.

    ``sample`` is uint8 [3, image_size, image_size] RGB, or ``transform`` of it.
    """

    classes = CLASSES

    def __init__(self, n: int, *, image_size: int = 32, seed: int = 0, colour: bool = False,
                 transform: Callable[[torch.Tensor], object] | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.n = n
        self.image_size = image_size
        self.seed = seed
        self.colour = colour
        self.transform = transform
        self.labels: list[int] = [i % len(CLASSES) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def render(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 [H, W, 3] (no transform)."""
        return render(i, image_size=self.image_size, seed=self.seed, colour=self.colour)

    def __getitem__(self, i: int) -> tuple[object, int]:
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} images")
        i %= self.n
        img = torch.from_numpy(self.render(i)).permute(2, 0, 1).contiguous()
        return (self.transform(img) if self.transform is not None else img), self.labels[i]
