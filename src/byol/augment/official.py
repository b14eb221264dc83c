"""The official semantics of T and T' (docs/fidelity.md): the ops whose arithmetic in the authors'
released code differs from torchvision's, as pure functions on tensors.

``augment.semantics=official`` (the default) computes every step of docs/method.md §3 the way the
release does; ``torchvision`` keeps torchvision.transforms.v2's ops (views.py, batched.py). The
steps on which the two differ, each proved against values recorded by running the release
(tests/test_augment_official.py, fixtures made by tools/official_reference/make_augment_fixtures.py):

- crop (``crop_box``): one draw of area and aspect ratio, width and height rounded half to even
  and cut to the image, offsets uniform; no retries and no centre-crop fallback;
- resize (``resize_bicubic``): TensorFlow's bicubic with half-pixel centres and no antialiasing
  (Keys' cubic, a = -0.5, weights read from a table of 1024 sub-pixel offsets, taps outside the
  image dropped and the others renormalised); float output, not clamped until the /255 and the
  clip to [0, 1] that follow it;
- brightness (``adjust_brightness``) adds a delta; contrast (``adjust_contrast``) blends each
  channel with that channel's own mean; saturation (``adjust_saturation``) scales the HSV
  saturation, capped at 1;
- blur (``gaussian_blur``) pads with zeros, its radius int(side * fraction / 2) may be 0;
- the evaluation crop (``center_crop_box``): a centre square of ``crop_fraction`` of the shorter
  side, then the same resize.

Hue, grayscale, solarize and normalisation are the same arithmetic in both semantics (batched.py's
functions serve both). Shapes: images are ``[..., 3, H, W]``, per-sample parameters ``[B]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The release's resize table: 1024 sub-pixel offsets per unit interval, Keys' cubic with a = -0.5.
_TABLE_SIZE = 1024
_KEYS_A = -0.5


def _f32(value: float) -> np.float32:
    return np.float32(value)


def crop_box(height: int, width: int, u: Sequence[float], *, scale: Sequence[float] = (0.08, 1.0),
             ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """The random crop of the release: ``(top, left, h, w)`` for an image of ``height`` x ``width``.

    ``u``: four uniforms in [0, 1) (read as float32) for, in this order, the area fraction, the
    log aspect ratio, the left offset and the top offset. In float32 as the release computes it:
    area = (lo + (hi - lo) u0) H W, aspect = exp(log r0 + (log r1 - log r0) u1), w =
    round(sqrt(area aspect)), h = round(sqrt(area / aspect)) (half to even), each cut to the image
    side; left = floor(u2 (W - w + 1)), top = floor(u3 (H - h + 1)) (in float64). One draw: a
    box taller or wider than the image is cut, not redrawn. A box side of 0, possible only on
    images of fewer than 5 pixels where the release would crop nothing, is made 1.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"crop_box needs a non-empty image, got {height}x{width}")
    u_area, u_ratio = _f32(u[0]), _f32(u[1])
    lo, hi = _f32(scale[0]), _f32(scale[1])
    target = (u_area * (hi - lo) + lo) * _f32(height * width)
    # log and exp correctly rounded to float32; the release's float32 exp (the C library's) is
    # within one ulp of that, which moves w or h only when sqrt(...) lies within ~1e-5 of a half.
    log_lo, log_hi = (_f32(math.log(float(_f32(r)))) for r in ratio)
    aspect = _f32(math.exp(float(u_ratio * (log_hi - log_lo) + log_lo)))
    w = min(int(np.rint(np.sqrt(target * aspect))), width)
    h = min(int(np.rint(np.sqrt(target / aspect))), height)
    w, h = max(w, 1), max(h, 1)
    left = min(int(float(_f32(u[2])) * (width - w + 1)), width - w)
    top = min(int(float(_f32(u[3])) * (height - h + 1)), height - h)
    return top, left, h, w


def center_crop_box(height: int, width: int, crop_fraction: float = 0.875) -> tuple[int, int, int, int]:
    """The release's evaluation crop: ``(top, left, side, side)``, a centre square of side
    int(crop_fraction * min(H, W)) (float32; 224/256 = 0.875 in the release) at offsets
    ((H - side) + 1) // 2 and ((W - side) + 1) // 2. At least 1 pixel."""
    side = max(1, int(_f32(crop_fraction) * _f32(min(height, width))))
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def _keys_table() -> tuple[np.ndarray, np.ndarray]:
    """The cubic's weights at the 1025 offsets d = i / 1024 of the table: for the two near taps
    (distance d) and the two far ones (distance 1 + d), computed in float64, stored in float32."""
    d = (np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE).astype(np.float32).astype(np.float64)
    a = _KEYS_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far_d = d + 1
    far = ((a * far_d - 5 * a) * far_d + 8 * a) * far_d - 4 * a
    return near.astype(np.float32), far.astype(np.float32)


@lru_cache(maxsize=4096)
def resize_taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
    """The four taps of each output pixel of a 1-D bicubic resize ``n_in`` -> ``n_out``:
    ``(index [4, n_out] int64, weight [4, n_out] float32)``, the separable weight matrix in sparse
    form (cached per size pair; callers must not modify the tensors).

    Output pixel o samples the input at s = (o + 0.5) n_in / n_out - 0.5 (float32); with
    i = floor(s) and the table offset k = rint((s - i) 1024), the taps i - 1, i, i + 1, i + 2 weigh
    far[k], near[k], near[1024 - k], far[1024 - k]. Taps outside the input weigh 0 (their index
    is clamped into it) and the four weights are scaled by 1 / their float32 sum.
    """
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"resize needs sizes > 0, got {n_in} -> {n_out}")
    near, far = _keys_table()
    scale = _f32(n_in) / _f32(n_out)
    pos = (np.arange(n_out, dtype=np.float32) + _f32(0.5)) * scale - _f32(0.5)
    base = np.floor(pos)
    offset = np.rint((pos - base) * _f32(_TABLE_SIZE)).astype(np.int64)
    weight = np.stack([far[offset], near[offset], near[_TABLE_SIZE - offset], far[_TABLE_SIZE - offset]])
    index = base.astype(np.int64)[None] + np.arange(-1, 3)[:, None]
    weight = np.where((index >= 0) & (index < n_in), weight, _f32(0))
    total = ((weight[0] + weight[1]) + weight[2]) + weight[3]
    weight = weight * (_f32(1) / total)
    return torch.from_numpy(index.clip(0, n_in - 1)), torch.from_numpy(weight.astype(np.float32))


def resize_matrix(n_in: int, n_out: int) -> Tensor:
    """``resize_taps`` as the dense ``[n_out, n_in]`` float32 weight matrix of the 1-D resize (built
    per call from the cached taps: a matrix per size pair would hold megabytes for photos of
    varied sizes; building one costs a few microseconds)."""
    index, weight = resize_taps(n_in, n_out)
    return torch.zeros(n_out, n_in).scatter_add_(1, index.T, weight.T)


def resize_bicubic(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow's bicubic resize (half-pixel centres, no antialiasing) as two matrix products,
    ``R_h x R_w^T`` with the weights of ``resize_taps``.

    ``[..., H, W]`` (uint8 values are read as float32) -> float32 ``[..., size[0], size[1]]``,
    not clamped: bicubic overshoots (below 0 and above 255 for 8-bit images). Equal to
    TensorFlow's output up to the order of the float32 sums (measured: within 6e-5 on 0..255
    values, tests/test_augment_official.py); the products are 3x faster than summing the four
    taps one by one at 32 px and 1.5x at 224 (docs/benchmarks.md).
    """
    x = x.to(torch.float32)
    rows = resize_matrix(x.shape[-2], size[0]).to(x.device)
    cols = resize_matrix(x.shape[-1], size[1]).to(x.device)
    return rows @ x @ cols.T


def crop_resize(img: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop ``box`` = (top, left, h, w) of a uint8 image, resize it bicubically to ``size`` x
    ``size``, divide by 255 and clip to [0, 1], as the release prepares every view and every
    evaluation image. uint8 ``[3, H, W]`` -> float32 ``[3, size, size]`` in [0, 1]."""
    top, left, h, w = box
    x = resize_bicubic(img[..., top:top + h, left:left + w], (size, size))
    return (x / 255.0).clamp_(0.0, 1.0)


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]`` on ``x``'s device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: Tensor, delta: Tensor) -> Tensor:
    """x + delta, not clipped (the jitter clips after each op). ``[B, 3, H, W]``, ``[B]`` -> ``[B, 3, H, W]``."""
    return x + _per_sample(delta, x)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """f (x - m_c) + m_c with m_c the mean of channel c of each image (not the mean luma), not
    clipped. ``[B, 3, H, W]``, ``factor [B]`` -> ``[B, 3, H, W]``."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    return _per_sample(factor, x) * (x - mean) + mean


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Scale the HSV saturation by ``factor``, capped to [0, 1], hue and value kept (the release's
    RGB -> HSV -> RGB round trip, in closed form).

    With v = max, spread = max - min and s = spread / v, each channel is v - (v - x) spread' /
    spread where spread' = clip(s f, 0, 1) v: so x' = v - (v - x) min(max(f, 0), v / spread).
    Grey pixels (spread 0) and pixels with v <= 0 (saturation 0) keep x' = v.
    ``[B, 3, H, W]``, ``factor [B]`` -> ``[B, 3, H, W]``, not clipped.
    """
    v = x.amax(dim=-3, keepdim=True)
    spread = v - x.amin(dim=-3, keepdim=True)
    cap = v / torch.where(spread > 0, spread, 1.0)
    ratio = torch.minimum(_per_sample(factor, x).clamp(min=0.0), cap)
    ratio = torch.where(v > 0, ratio, 0.0)
    return v - (v - x) * ratio


def blur_radius(size: int, fraction: float) -> int:
    """The release's blur radius: int(size / (1 / fraction) / 2), the kernel 2 r + 1 pixels
    (224 px at 0.1: r = 11, 23x23; 32 px: r = 1, 3x3; below 20 px: r = 0, no blur)."""
    if size <= 0 or fraction <= 0:
        raise ValueError(f"blur_radius needs size > 0 and fraction > 0, got {size}, {fraction}")
    return int(size / (1.0 / fraction) / 2.0)


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with zero padding (the release's "SAME" convolution), along W then H.

    Weights exp(-t^2 / (2 sigma^2)) at t = -r..r, normalised to sum 1, one kernel per sample.
    ``[B, C, H, W]``, ``sigma [B]`` -> ``[B, C, H, W]``; ``radius`` 0 returns ``x``.
    """
    if radius < 0:
        raise ValueError(f"gaussian_blur radius must be >= 0, got {radius!r}")
    if radius == 0:
        return x
    b, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(device=x.device, dtype=x.dtype).view(-1, 1)
    k = torch.exp(-(t * t) / (2.0 * (s * s)))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [B*C, 2r+1]
    planes = x.reshape(1, b * c, h, w)
    planes = F.conv2d(planes, k.view(b * c, 1, 1, -1), padding=(0, radius), groups=b * c)
    planes = F.conv2d(planes, k.view(b * c, 1, -1, 1), padding=(radius, 0), groups=b * c)
    return planes.view(b, c, h, w)
