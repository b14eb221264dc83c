"""The fast augmentation path: the photometric steps of T and T' (docs/method.md §3), batched.

The data flow (docs/architecture.md, "Data flow"): workers only crop, resize and flip
(``views.CropFlip``) to ``[3, size, size]``: uint8 in torchvision semantics, float32 in [0, 1]
in official semantics (the release's resize is float and only clipped after the /255,
docs/fidelity.md); the colour jitter (four adjustments in a per-sample random order),
grayscale, Gaussian blur, solarize and normalisation run here on a whole batch
``[B, 3, H, W]`` with every parameter drawn per sample and per view, as the reference path
(``views.photometric_ops``) draws them per call. Each op is a pure tensor function taking
per-sample parameters ``[B]``; each matches the torchvision.transforms.v2.functional op of the
same name on one image with the same parameter (tests/test_augment_batched.py). In official
semantics brightness, contrast, saturation and blur are ``official``'s functions, the other ops
these (the same arithmetic as the release's).

The costly ops (hue: an HSV round trip; blur) run either on the whole batch and are kept by a
mask (no host synchronisation, the choice on accelerators) or on the gathered subset of samples
that draw them (``compact``, the default on the CPU where reading the mask is free: 1.5-2x
faster there).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from byol.augment import official
from byol.augment.views import SOLARIZE_THRESHOLD, ViewSpec, blur_kernel_size

# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.2989, 0.587, 0.114)
# Jitter op ids, the numbering of torchvision's ColorJitter fn_idx.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


def _per_sample(values: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, 1, 1]``, broadcastable against ``[B, 3, H, W]``."""
    return values.view(-1, 1, 1, 1)


def _blend(x: Tensor, ref: Tensor, factor: Tensor) -> Tensor:
    """clamp(f x + (1 - f) ref, 0, 1) per sample, torchvision's ``_blend`` (to float rounding:
    computed as ``lerp(ref, x, f)``, one pass). Exactly ``x`` at f = 1."""
    return torch.lerp(ref, x, _per_sample(factor).to(x.dtype)).clamp_(0.0, 1.0)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma of an RGB batch. ``[B, 3, H, W] -> [B, 1, H, W]`` (expand to 3 channels as needed)."""
    r, g, b = x.unbind(dim=-3)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(-3)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Brightness jitter: clamp(b x). ``[B, 3, H, W]``, ``factor [B]`` -> ``[B, 3, H, W]``."""
    return _blend(x, torch.zeros((), dtype=x.dtype, device=x.device), factor)


def _mean_luma(luma: Tensor) -> Tensor:
    """Each image's mean luma: ``[B, 1, H, W] -> [B, 1, 1, 1]`` (contrast blends towards it)."""
    return luma.mean(dim=(-3, -2, -1), keepdim=True)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Contrast jitter: blend with the image's mean luma. ``[B, 3, H, W]``, ``[B]`` -> ``[B, 3, H, W]``."""
    return _blend(x, _mean_luma(rgb_to_grayscale(x)), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Saturation jitter: blend with the luma image. ``[B, 3, H, W]``, ``[B]`` -> ``[B, 3, H, W]``."""
    return _blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Hue jitter: rotate the hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space.

    ``[B, 3, H, W]``, ``shift [B]`` -> ``[B, 3, H, W]``, computed in float32 at least. Pillow's /
    torchvision's RGB -> HSV -> RGB round trip in closed form: with h6 = 6 h the hexcone hue,
    each channel is v - (max - min) clamp(min(k, 4 - k), 0, 1), k = (n + h6 + 6 shift) mod 6,
    n = 5, 3, 1 for R, G, B (v s = max - min, so s is never formed). Equal to torchvision's
    per-sector table within 2e-6 (tests) and 4x faster than the HSV round trip on the CPU.
    """
    dtype, x = x.dtype, x.float()
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    spread = maxc - torch.minimum(torch.minimum(r, g), b)
    inv = 1.0 / torch.where(spread == 0, 1.0, spread)  # grey pixels: spread 0, any hue
    h6 = torch.where(maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 = (h6 + shift.float().view(-1, 1, 1) * 6.0).unsqueeze(-3)
    # arange builds n on the device (no host-to-device copy): 5, 3, 1.
    k = (h6 + torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).remainder(6.0)
    out = maxc.unsqueeze(-3) - spread.unsqueeze(-3) * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return out.to(dtype)


def masked_apply(x: Tensor, mask: Tensor, fn, param: Tensor, *, compact: bool) -> Tensor:
    """``fn(x, param)`` for the samples where ``mask``, the others untouched. ``[B, ...]``, ``[B]``.

    ``compact`` runs ``fn`` on the gathered subset only (reads the mask on the host: a device
    synchronisation on CUDA); otherwise on the whole batch, selected by ``torch.where``.
    """
    if not compact:
        return torch.where(_per_sample(mask), fn(x, param), x)
    idx = mask.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    return x.index_copy(0, idx, fn(x.index_select(0, idx), param.index_select(0, idx)))


def _gaussian_kernels(size: int, sigma: Tensor, dtype: torch.dtype) -> Tensor:
    """One normalised 1-D Gaussian per sample: ``sigma [B]`` -> ``[B, size]``.

    torchvision's grid: ``size`` points on [-(size-1)/(2 sqrt 2), +(size-1)/(2 sqrt 2)], weights
    softmax(-(x / sigma)^2), so that the reference blur is matched to float rounding.
    """
    lim = (size - 1) / (2.0 * 2.0 ** 0.5)
    grid = torch.linspace(-lim, lim, steps=size, dtype=dtype, device=sigma.device)
    return torch.softmax(-(grid / sigma.to(dtype).unsqueeze(1)).pow(2), dim=1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur with a per-sample sigma (docs/method.md §3), reflect padding like torchvision.

    ``[B, C, H, W]``, ``sigma [B]`` -> ``[B, C, H, W]``. The 2-D kernel is separable: one
    depthwise pass along W, one along H, so the cost is 2k rather than k^2 per pixel.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur kernel_size must be odd and >= 1, got {kernel_size!r}")
    b, c, h, w = x.shape
    k = _gaussian_kernels(kernel_size, sigma, x.dtype).repeat_interleave(c, dim=0)  # [B*C, k]
    pad = kernel_size // 2
    planes = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    planes = F.conv2d(planes, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    planes = F.conv2d(planes, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return planes.view(b, c, h, w)


def solarize(x: Tensor, threshold: float = SOLARIZE_THRESHOLD) -> Tensor:
    """Solarize (docs/method.md §3): x <- 1 - x where x >= threshold. ``[B, 3, H, W] -> [B, 3, H, W]``."""
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: Tensor, mean, std) -> Tensor:
    """(x - mean) / std per channel. ``[B, 3, H, W] -> [B, 3, H, W]``."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass
class PhotometricParams:
    """Per-sample draws of the photometric steps of one view (docs/method.md §3), all of length B.

    ``order [B, 4]`` is the jitter order (op ids BRIGHTNESS..HUE, applied left to right);
    ``brightness``/``contrast``/``saturation`` are blend factors (in official semantics
    ``brightness`` is an additive delta) and ``hue`` a hue shift in turns, used only where
    ``jitter``; ``sigma`` is used only where ``blur``.
    """

    jitter: Tensor
    order: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    def to(self, device) -> PhotometricParams:
        """The same draws on ``device``."""
        return PhotometricParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _clipped(fn, x: Tensor, param: Tensor) -> Tensor:
    """``fn(x, param)`` clipped to [0, 1]: each jitter op of the official semantics."""
    return fn(x, param).clamp_(0.0, 1.0)


class BatchedPhotometric:
    """The photometric part of one view distribution T or T' (docs/method.md §3), batched.

    ``[B, 3, H, W]`` (cropped and flipped by the workers: uint8 in torchvision semantics, float32
    in [0, 1] in official semantics, which also takes uint8 as k / 255) -> float32
    ``[B, 3, H, W]`` normalised with ``spec.mean``/``spec.std``: jitter (prob ``jitter_prob``,
    random order), grayscale, blur, solarize, clamp to [0, 1], normalise -- the steps and
    distributions of ``views.photometric_ops(spec)`` followed by ``Normalize``, drawn
    independently per sample, in ``spec.semantics``.

    Randomness comes only from the ``generator`` passed to each call. Parameters are drawn on
    the generator's device and moved to the batch's device: a CPU generator gives the same
    draws (so the same augmentation) for a batch on the CPU or on CUDA; a CUDA generator
    avoids the small host-to-device copy. ``compact`` (see ``masked_apply``) defaults to True
    on the CPU and False elsewhere; both give the same pixels up to float rounding. A plain class.
    """

    def __init__(self, spec: ViewSpec, *, compact: bool | None = None) -> None:
        self.spec = spec
        self.compact = compact
        if spec.is_official:
            self.blur_radius = official.blur_radius(spec.size, spec.blur_kernel_fraction)
        else:
            self.kernel_size = blur_kernel_size(spec.size, spec.blur_kernel_fraction)

    def __repr__(self) -> str:
        return f"BatchedPhotometric({self.spec})"

    def _uniform(self, n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)

    def _coin(self, n: int, p: float, generator: torch.Generator) -> Tensor:
        # rand < p, as torchvision's RandomApply: p = 0 never, p = 1 always.
        return torch.rand(n, generator=generator, device=generator.device) < p

    def sample_params(self, batch: int, generator: torch.Generator) -> PhotometricParams:
        """Draw every parameter for ``batch`` samples from ``generator`` (on its device).

        torchvision semantics, ColorJitter's ranges: factor ~ U[max(0, 1 - a), 1 + a] for
        brightness, contrast and saturation. Official semantics, the release's: a brightness
        delta ~ U[-a, a], contrast and saturation factors ~ U[1 - a, 1 + a]. Both: hue ~ U[-h, h];
        the order is a uniform permutation per sample; sigma ~ U[blur_sigma].
        """
        s, g, n = self.spec, generator, batch
        low = (lambda a: 1 - a) if s.is_official else (lambda a: max(0.0, 1 - a))
        return PhotometricParams(
            jitter=self._coin(n, s.jitter_prob, g),
            # argsort of i.i.d. uniforms is a uniform random permutation (ties have prob ~0).
            order=torch.rand(n, 4, generator=g, device=g.device, dtype=torch.float64).argsort(dim=1),
            brightness=(self._uniform(n, -s.brightness, s.brightness, g) if s.is_official
                        else self._uniform(n, max(0.0, 1 - s.brightness), 1 + s.brightness, g)),
            contrast=self._uniform(n, low(s.contrast), 1 + s.contrast, g),
            saturation=self._uniform(n, low(s.saturation), 1 + s.saturation, g),
            hue=self._uniform(n, -s.hue, s.hue, g),
            grayscale=self._coin(n, s.grayscale_prob, g),
            blur=self._coin(n, s.blur_prob, g),
            sigma=self._uniform(n, s.blur_sigma[0], s.blur_sigma[1], g),
            solarize=self._coin(n, s.solarize_prob, g),
        )

    def _jitter(self, x: Tensor, p: PhotometricParams, compact: bool) -> Tensor:
        """Colour jitter, each sample in its own order; samples with ``jitter`` False untouched.

        At each of the 4 positions every sample runs one op. ``adjust_brightness``,
        ``adjust_contrast`` and ``adjust_saturation`` are all ``_blend(x, ref, f)`` with ref 0,
        the mean luma or the luma, so one ``_blend`` per position serves all three, each sample
        with its own op's ref and factor (factor 1, an exact identity, where the op there is hue
        or jitter is off): the arithmetic of those three functions in one pass instead of three.
        Hue goes through ``masked_apply``.
        """
        factors = torch.stack((p.brightness, p.contrast, p.saturation, torch.ones_like(p.hue)), dim=1)
        factors = torch.where(p.jitter.unsqueeze(1), factors, 1.0)
        for pos in range(4):
            op = p.order[:, pos]
            luma = rgb_to_grayscale(x)
            # brightness's ref, 0, is neither term
            ref = luma * _per_sample(op == SATURATION) + _mean_luma(luma) * _per_sample(op == CONTRAST)
            x = _blend(x, ref, factors.gather(1, op.unsqueeze(1)).squeeze(1))
            if self.spec.hue > 0:  # ColorJitter skips hue=0 (an HSV round trip is not exact)
                x = masked_apply(x, p.jitter & (op == HUE), adjust_hue, p.hue, compact=compact)
        return x

    def _official_jitter(self, x: Tensor, p: PhotometricParams, compact: bool) -> Tensor:
        """Official colour jitter (docs/fidelity.md): at each of the 4 positions every jittered
        sample runs its op there, clipped to [0, 1]; ops of strength 0 are left out."""
        s = self.spec
        ops = ((BRIGHTNESS, s.brightness, official.adjust_brightness, p.brightness),
               (CONTRAST, s.contrast, official.adjust_contrast, p.contrast),
               (SATURATION, s.saturation, official.adjust_saturation, p.saturation),
               (HUE, s.hue, adjust_hue, p.hue))
        for pos in range(4):
            at = p.order[:, pos]
            for op, strength, fn, param in ops:
                if strength > 0:
                    x = masked_apply(x, p.jitter & (at == op), partial(_clipped, fn), param, compact=compact)
        return x

    def _official(self, x: Tensor, p: PhotometricParams, compact: bool) -> Tensor:
        """Rows 3-6 of docs/method.md §3 as the release computes them, as
        ``views.OfficialPhotometric`` does per image. float ``[B, 3, H, W]`` in [0, 1] -> same."""
        if self.spec.jitter_prob > 0:
            x = self._official_jitter(x, p, compact)
        if self.spec.grayscale_prob > 0:
            x = torch.where(_per_sample(p.grayscale), rgb_to_grayscale(x).expand_as(x), x)
        x = x.clamp(0.0, 1.0)  # the end of the release's colour stage
        if self.spec.blur_prob > 0 and self.blur_radius > 0:
            blur = partial(official.gaussian_blur, radius=self.blur_radius)
            x = masked_apply(x, p.blur, blur, p.sigma, compact=compact)
        if self.spec.solarize_prob > 0:
            x = torch.where(_per_sample(p.solarize), solarize(x), x)
        return x

    def _official_input(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or x.dtype not in (torch.float32, torch.uint8):
            raise ValueError("BatchedPhotometric input must be float32 in [0, 1] (or uint8) [B, 3, H, W] "
                             f"in official semantics, got {x.dtype} {tuple(x.shape)}")
        return x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x

    def apply(self, x: Tensor, params: PhotometricParams) -> Tensor:
        """The photometric steps with the given draws. ``[B, 3, H, W]`` -> float32 normalised:
        uint8 in torchvision semantics, float32 in [0, 1] (or uint8) in official semantics."""
        p = params.to(x.device)
        compact = x.device.type == "cpu" if self.compact is None else self.compact
        if self.spec.is_official:
            x = self._official(self._official_input(x), p, compact)
            return normalize(x.clamp(0.0, 1.0), self.spec.mean, self.spec.std)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"BatchedPhotometric input must be uint8 [B, 3, H, W], got {x.dtype} {tuple(x.shape)}"
            )
        x = x.to(torch.float32).mul_(1.0 / 255)  # as v2.ToDtype(float32, scale=True)
        if self.spec.jitter_prob > 0:
            x = self._jitter(x, p, compact)
        if self.spec.grayscale_prob > 0:
            x = torch.where(_per_sample(p.grayscale), rgb_to_grayscale(x).expand_as(x), x)
        if self.spec.blur_prob > 0:
            blur = partial(gaussian_blur, kernel_size=self.kernel_size)
            x = masked_apply(x, p.blur, blur, p.sigma, compact=compact)
        if self.spec.solarize_prob > 0:
            x = torch.where(_per_sample(p.solarize), solarize(x), x)
        # The reference path ends its photometric stage with Clamp01 too.
        return normalize(x.clamp(0.0, 1.0), self.spec.mean, self.spec.std)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One view per sample: draw parameters for ``len(x)`` samples, then ``apply``."""
        return self.apply(x, self.sample_params(x.shape[0], generator))
