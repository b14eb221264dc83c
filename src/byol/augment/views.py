"""The reference augmentation path: per-image pipelines T and T', in either semantics.

docs/method.md §3 (paper Table 6): random resized crop -> horizontal flip -> colour jitter (random
order) -> grayscale -> Gaussian blur -> solarize -> normalise, every parameter drawn afresh on
every call, i.e. per image and per view, from the global torch RNG (the loader seeds it per
sample). The pipelines run in DataLoader workers on uint8 ``[3, H, W]`` images and return
float32 ``[3, size, size]``. ``ViewSpec.semantics`` says how each op computes (docs/fidelity.md):
``torchvision`` with torchvision.transforms.v2, ``official`` as the authors' release does
(``official.py``: its crop, resize, brightness, contrast, saturation and blur).

The pipeline is split into the stages of the data flow (docs/architecture.md) so that the fast batched
path (``batched.py``) can be tested against it stage by stage:

- ``geometric_ops``: crop + flip (``CropFlip``: the same draws and pixels as one module, what
  the workers do in the fast path): uint8 out in torchvision semantics; float32 in [0, 1] in
  official semantics, whose resize is float and only clipped after the /255;
- ``photometric_ops``: jitter, grayscale, blur, solarize on float ``[0, 1]``, one module per
  step of docs/method.md §3 in torchvision semantics, one module (``OfficialPhotometric``) for
  all of them in official semantics; what the device does per sample in the fast path;
- ``Normalize`` with ImageNet mean and std.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from byol.augment import official
from byol.presets import AUGMENT_SEMANTICS, BLUR_KERNEL_FRACTION, BYOL_AUGMENT, IMAGENET_MEAN, IMAGENET_STD

# T and T' of Table 6 (docs/method.md §3), typed once in presets.py: (T, T') pairs for blur_prob
# and solarize_prob, the rest shared.
_T6 = BYOL_AUGMENT

# Solarize inverts pixels at or above half intensity (docs/method.md §3: x <- 1 - x where x >= 0.5).
SOLARIZE_THRESHOLD = 0.5


def _fail(name: str, rule: str, value) -> None:
    raise ValueError(f"augment.{name} must be {rule}, got {value!r}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _fail(name, "in [0, 1]", value)


def _check_range(name: str, value: tuple[float, float], upper: float = math.inf) -> None:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= upper:
        bound = "" if upper == math.inf else f" <= {upper:g}"
        _fail(name, f"a pair 0 < min <= max{bound}", value)


@dataclass(frozen=True)
class ViewSpec:
    """One view distribution, T or T' of docs/method.md §3. Probabilities are per image and per view.

    ``size`` is the output side (224 for ImageNet, 32 for CIFAR); ``blur_kernel_fraction`` the
    blur kernel side as a fraction of ``size`` (23x23 at 224, see ``blur_kernel_size`` and
    ``official.blur_radius``); ``semantics`` how each op computes (``AUGMENT_SEMANTICS``,
    docs/fidelity.md).
    """

    size: int = _T6["size"]
    crop_scale: tuple[float, float] = _T6["crop_scale"]
    crop_ratio: tuple[float, float] = _T6["crop_ratio"]
    flip_prob: float = _T6["flip_prob"]
    jitter_prob: float = _T6["jitter_prob"]
    brightness: float = _T6["brightness"]
    contrast: float = _T6["contrast"]
    saturation: float = _T6["saturation"]
    hue: float = _T6["hue"]
    grayscale_prob: float = _T6["grayscale_prob"]
    blur_prob: float = _T6["blur_prob"][0]  # T's
    blur_sigma: tuple[float, float] = _T6["blur_sigma"]
    blur_kernel_fraction: float = BLUR_KERNEL_FRACTION
    solarize_prob: float = _T6["solarize_prob"][0]  # T's
    mean: tuple = _T6["mean"]
    std: tuple = _T6["std"]
    semantics: str = AUGMENT_SEMANTICS[0]  # official

    def __post_init__(self) -> None:
        # Configs loaded from YAML give lists; store tuples so the spec stays hashable.
        for name in ("crop_scale", "crop_ratio", "blur_sigma", "mean", "std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.size <= 0:
            _fail("size", "> 0", self.size)
        _check_range("crop_scale", self.crop_scale, upper=1.0)
        _check_range("crop_ratio", self.crop_ratio)
        _check_range("blur_sigma", self.blur_sigma)
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            _check_prob(name, getattr(self, name))
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                _fail(name, ">= 0", getattr(self, name))
        if not 0.0 <= self.hue <= 0.5:
            _fail("hue", "in [0, 0.5]", self.hue)
        if not 0.0 < self.blur_kernel_fraction <= 1.0:
            _fail("blur_kernel_fraction", "in (0, 1]", self.blur_kernel_fraction)
        if len(self.mean) != 3:
            _fail("mean", "3 values (RGB)", self.mean)
        if len(self.std) != 3 or min(self.std) <= 0:
            _fail("std", "3 values > 0 (RGB)", self.std)
        if self.semantics not in AUGMENT_SEMANTICS:
            _fail("semantics", f"one of {', '.join(AUGMENT_SEMANTICS)}", self.semantics)

    @property
    def is_official(self) -> bool:
        """Whether the ops compute as the authors' release does (docs/fidelity.md)."""
        return self.semantics == "official"


def byol_view_specs(size: int = _T6["size"], *, blur: bool = True, **overrides) -> tuple[ViewSpec, ViewSpec]:
    """(T, T') of docs/method.md §3: they differ only in blur (1.0 vs 0.1) and solarize (0.0 vs 0.2).

    ``blur=False`` drops blur from both views, the usual choice for 32-px images (a 3-pixel
    kernel does little). ``overrides`` (any ViewSpec field) apply to both views.
    """
    base = ViewSpec(size=size, **overrides)
    t1, t2 = (replace(base, blur_prob=_T6["blur_prob"][v] if blur else 0.0,
                      solarize_prob=_T6["solarize_prob"][v]) for v in (0, 1))
    return t1, t2


def blur_kernel_size(size: int, fraction: float = BLUR_KERNEL_FRACTION) -> int:
    """Odd blur kernel side, ``fraction`` of the image side (docs/method.md §3): 224 -> 23, 32 -> 3.

    int(fraction * size), bumped to the next odd number (a Gaussian kernel needs a centre
    pixel), and at least 3 (a 1-pixel kernel would not blur at all).
    """
    if size <= 0 or fraction <= 0:
        raise ValueError(f"blur_kernel_size needs size > 0 and fraction > 0, got {size}, {fraction}")
    # The epsilon keeps e.g. 0.1 * 30 = 3.0000000000000004 or 2.9999999999999996 at 3.
    k = int(fraction * size + 1e-9)
    k = k if k % 2 == 1 else k + 1
    return max(k, 3)


class Clamp01(nn.Module):
    """Clamp a float image to [0, 1]. ``[..., 3, H, W] -> [..., 3, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(0.0, 1.0)


def geometric_ops(spec: ViewSpec) -> list[nn.Module]:
    """Crop and flip (docs/method.md §3, rows 1-2). uint8 ``[3, H, W]`` -> ``[3, size, size]``.

    torchvision semantics: ``RandomResizedCrop`` (area ~ U[crop_scale] of the image, aspect ratio
    log-uniform in crop_ratio, up to 10 tries then a centre crop), bicubic with antialiasing,
    rounded and clamped to uint8, then ``RandomHorizontalFlip``: uint8 out. Official semantics:
    one ``CropFlip`` (``official.crop_box``, TensorFlow's bicubic, /255, clip, flip): float32 in
    [0, 1] out.
    """
    if spec.is_official:
        return [CropFlip(spec)]
    return [
        v2.RandomResizedCrop(
            spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio,
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        ),
        v2.RandomHorizontalFlip(spec.flip_prob),
    ]


class CropFlip(nn.Module):
    """The geometric stage, crop + resize + flip, as one module: what the workers do.

    torchvision semantics: ``geometric_ops(spec)`` with the same random draws, in the same order,
    and the same pixels as ``v2.Compose(geometric_ops(spec))`` (tested), without v2's per-call
    input flattening and dispatch (1.4x faster on 32-px images, where that overhead rivals the
    resize). uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]``.

    Official semantics (docs/fidelity.md): the release's crop box from ``torch.rand(4)``
    (``official.crop_box``), ``official.crop_resize`` (bicubic, /255, clip), then a flip when
    ``torch.rand(1) < flip_prob`` (the release flips after the resize; flip and resize commute
    only up to rounding, so the order is kept). uint8 ``[3, H, W]`` -> float32 ``[3, size, size]``
    in [0, 1].
    """

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__()
        self.spec = spec
        self.size = [spec.size, spec.size]
        if not spec.is_official:
            self.crop, self.flip = geometric_ops(spec)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"semantics={s.semantics}, size={s.size}, scale={s.crop_scale}, ratio={s.crop_ratio}, "
                f"flip_prob={s.flip_prob}") if s.is_official else ""

    def forward(self, img: Tensor) -> Tensor:
        if self.spec.is_official:
            s = self.spec
            box = official.crop_box(img.shape[-2], img.shape[-1], torch.rand(4).tolist(),
                                    scale=s.crop_scale, ratio=s.crop_ratio)
            out = official.crop_resize(img, box, s.size)
            return out.flip(-1) if torch.rand(1) < s.flip_prob else out
        box = self.crop.make_params([img])  # top, left, height, width: RandomResizedCrop's draw
        img = F.resized_crop(img, **box, size=self.size, interpolation=InterpolationMode.BICUBIC,
                             antialias=True)
        # RandomHorizontalFlip's draw: one rand(1), flip when below p
        return F.horizontal_flip(img) if torch.rand(1) < self.flip.p else img


def photometric_ops(spec: ViewSpec) -> list[nn.Module]:
    """Jitter, grayscale, blur, solarize (docs/method.md §3, rows 3-6), then a clamp to [0, 1].

    float32 ``[3, H, W]`` in [0, 1] -> float32 ``[3, H, W]`` in [0, 1]. torchvision semantics:
    one module per step, steps whose probability is 0 left out, so the list names exactly the
    steps that can happen. Official semantics: ``[OfficialPhotometric(spec)]``.
    """
    if spec.is_official:
        return [OfficialPhotometric(spec)]
    # torchvision 0.29 v2.ColorJitter.make_params draws ``fn_idx = torch.randperm(4)`` and new
    # factors on every call (Transform.forward calls make_params each time), and transform()
    # applies brightness/contrast/saturation/hue in that order: a fresh random order per
    # image, as docs/method.md §3 asks. Checked in the source and by tests/test_augment_views.py.
    jitter = v2.ColorJitter(
        brightness=spec.brightness, contrast=spec.contrast, saturation=spec.saturation, hue=spec.hue
    )
    ops: list[nn.Module] = [
        v2.RandomApply([jitter], p=spec.jitter_prob),
        # Keeps 3 channels (num_output_channels follows the input), as the encoder expects.
        v2.RandomGrayscale(spec.grayscale_prob),
    ]
    if spec.blur_prob > 0:
        # A sigma range: torchvision draws sigma ~ U[min, max] per call (not a radius).
        kernel = blur_kernel_size(spec.size, spec.blur_kernel_fraction)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=spec.blur_sigma)], p=spec.blur_prob))
    if spec.solarize_prob > 0:
        # On float images torchvision inverts as 1 - x where x >= threshold.
        ops.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=spec.solarize_prob))
    # Every op above maps [0, 1] into itself up to rounding (jitter clamps, grayscale and blur
    # are convex combinations, solarize maps [0.5, 1] to [0, 0.5]); one final clamp makes the
    # stage's output range exact, which the batched path is compared against.
    ops.append(Clamp01())
    return ops


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1).item()


def _coin(p: float) -> bool:
    return bool(torch.rand(1) < p)  # p = 0 never, p = 1 always


class OfficialPhotometric(nn.Module):
    """Rows 3-6 of docs/method.md §3 in official semantics (docs/fidelity.md), on one image.

    float32 ``[3, H, W]`` in [0, 1] -> float32 ``[3, H, W]`` in [0, 1]. ``make_params`` draws,
    from the global torch RNG: the jitter coin (``jitter_prob``), the order of the four
    adjustments (a uniform permutation), a brightness delta ~ U[-b, b], contrast and saturation
    factors ~ U[1 - s, 1 + s], a hue shift ~ U[-h, h] (turns), the grayscale, blur and solarize
    coins and sigma ~ U[blur_sigma]; ``transform`` applies them: when jittered, each adjustment
    whose strength is > 0 in the drawn order, each clipped to [0, 1]; grayscale; clip; blur with
    zero padding and radius ``official.blur_radius``; solarize (x >= 0.5 -> 1 - x); clip. Hue,
    grayscale and solarize are torchvision's functions (the same arithmetic as the release's);
    brightness, contrast, saturation and blur are ``official``'s. The batched path
    (``batched.BatchedPhotometric``) is tested against this module with the same draws.
    """

    def __init__(self, spec: ViewSpec) -> None:
        super().__init__()
        self.spec = spec
        self.radius = official.blur_radius(spec.size, spec.blur_kernel_fraction)

    def extra_repr(self) -> str:
        return repr(self.spec)

    def make_params(self) -> dict:
        s = self.spec
        return dict(
            jitter=_coin(s.jitter_prob), order=torch.randperm(4).tolist(),
            brightness=_uniform(-s.brightness, s.brightness),
            contrast=_uniform(1 - s.contrast, 1 + s.contrast),
            saturation=_uniform(1 - s.saturation, 1 + s.saturation),
            hue=_uniform(-s.hue, s.hue),
            grayscale=_coin(s.grayscale_prob), blur=_coin(s.blur_prob),
            sigma=_uniform(*s.blur_sigma), solarize=_coin(s.solarize_prob),
        )

    def _adjust(self, x: Tensor, op: int, params: dict) -> Tensor:
        """Jitter op ``op`` (0 brightness, 1 contrast, 2 saturation, 3 hue) on one image."""
        if op == 3:
            return F.adjust_hue(x, params["hue"])
        fn = (official.adjust_brightness, official.adjust_contrast, official.adjust_saturation)[op]
        name = ("brightness", "contrast", "saturation")[op]
        return fn(x[None], torch.tensor([params[name]], dtype=torch.float32))[0]

    def transform(self, x: Tensor, params: dict) -> Tensor:
        s = self.spec
        if params["jitter"]:
            strengths = (s.brightness, s.contrast, s.saturation, s.hue)
            for op in params["order"]:
                if strengths[op] > 0:  # the release leaves an op of strength 0 out
                    x = self._adjust(x, int(op), params).clamp(0.0, 1.0)
        if params["grayscale"]:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        x = x.clamp(0.0, 1.0)
        if params["blur"]:
            x = official.gaussian_blur(x[None], torch.tensor([params["sigma"]], dtype=torch.float32),
                                       self.radius)[0]
        if params["solarize"]:
            x = F.solarize(x, SOLARIZE_THRESHOLD)
        return x.clamp(0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.transform(x, self.make_params())


def view_transform(spec: ViewSpec) -> v2.Compose:
    """One view t ~ T (or T') of docs/method.md §3. uint8 ``[3, H, W]`` (any H, W) -> float32
    ``[3, size, size]``, normalised with ``spec.mean``/``spec.std``, in ``spec.semantics``.

    Every call draws new parameters: one call per image and per view.
    """
    # Photometric ops work on float [0, 1], as the batched device path will; the official
    # geometric stage already gives float [0, 1].
    to_float = [] if spec.is_official else [v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose([
        *geometric_ops(spec),
        *to_float,
        *photometric_ops(spec),
        v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
    ])


class TwoViews:
    """x -> (t(x), t'(x)), t ~ T and t' ~ T' drawn independently (docs/method.md §1, §3).

    uint8 ``[3, H, W]`` -> two float32 ``[3, size, size]``. A plain class (not a lambda) so it
    pickles into DataLoader workers.
    """

    def __init__(self, t1, t2) -> None:
        self.t1, self.t2 = t1, t2

    def __call__(self, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.t1(img), self.t2(img)

    def __repr__(self) -> str:
        return f"TwoViews(\n  t1={self.t1},\n  t2={self.t2})"


def two_view_transform(spec1: ViewSpec, spec2: ViewSpec) -> TwoViews:
    """The pretraining transform: views from T = ``spec1`` and T' = ``spec2`` (docs/method.md §3)."""
    return TwoViews(view_transform(spec1), view_transform(spec2))


class OfficialCenterCrop(nn.Module):
    """The release's evaluation crop (docs/fidelity.md): ``official.center_crop_box`` (a centre
    square of ``crop_fraction`` of the shorter side), TensorFlow's bicubic resize to ``size``,
    /255, clip. uint8 ``[3, H, W]`` -> float32 ``[3, size, size]`` in [0, 1]."""

    def __init__(self, size: int, crop_fraction: float) -> None:
        super().__init__()
        self.size, self.crop_fraction = size, crop_fraction

    def extra_repr(self) -> str:
        return f"size={self.size}, crop_fraction={self.crop_fraction}"

    def forward(self, img: Tensor) -> Tensor:
        box = official.center_crop_box(img.shape[-2], img.shape[-1], self.crop_fraction)
        return official.crop_resize(img, box, self.size)


def eval_transform(
    size: int,
    *,
    crop_fraction: float = 0.875,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    semantics: str = "torchvision",
) -> v2.Compose:
    """Deterministic evaluation transform (docs/method.md §5: centre crop 224 of 256).

    uint8 ``[3, H, W]`` -> float32 ``[3, size, size]`` normalised. torchvision semantics: resize
    the shorter side to round(size / crop_fraction) (bicubic, antialiased), centre crop ``size``;
    ``crop_fraction=1.0`` resizes the shorter side to ``size`` (32-px data). Official semantics
    (docs/fidelity.md): crop the centre square of side int(crop_fraction * min(H, W)), then
    resize it to ``size`` (``OfficialCenterCrop``). The default is torchvision: callers that do
    not know the run's semantics keep the transform they had; ``data.transforms.
    make_eval_transform`` passes the run's ``augment.semantics``.
    """
    if size <= 0:
        raise ValueError(f"eval.size must be > 0, got {size!r}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"eval.crop_fraction must be in (0, 1], got {crop_fraction!r}")
    if semantics not in AUGMENT_SEMANTICS:
        raise ValueError(f"augment.semantics must be one of {', '.join(AUGMENT_SEMANTICS)}, got {semantics!r}")
    normalize = v2.Normalize(mean=list(mean), std=list(std))
    if semantics == "official":
        return v2.Compose([OfficialCenterCrop(size, crop_fraction), normalize])
    return v2.Compose([
        v2.Resize(round(size / crop_fraction), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        normalize,
    ])


def denormalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo Normalize for plots and tests. ``[..., 3, H, W] -> [..., 3, H, W]`` in ~[0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * s + m
