"""The reference augmentation path (docs/method.md §3): shapes, reference values, and the rates and
per-call randomness of every step, measured on tiny generated images. Tests of torchvision's own
modules pin ``semantics="torchvision"``; the others run in both semantics (docs/fidelity.md; the
official ops themselves are proved in tests/test_augment_official.py).

Rates are checked against the binomial standard deviation: |rate - p| < 5 sigma with
sigma = sqrt(p (1 - p) / n); the seeds make each run deterministic, the 5 sigma makes the bound
honest (a correct pipeline fails it with probability ~6e-7 for a fresh seed).
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from byol.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TwoViews,
    ViewSpec,
    blur_kernel_size,
    byol_view_specs,
    denormalize,
    eval_transform,
    two_view_transform,
    view_transform,
)

N_DRAWS = 2000
TV = "torchvision"
SEMANTICS = pytest.mark.parametrize("semantics", ["official", TV])


@pytest.fixture(autouse=True)
def one_thread():
    # DataLoader workers run torch with one thread; on tiny images intra-op threads only add
    # overhead (10x slower on 2 busy cores), so the statistical tests run the same way.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def find(transform, cls):
    """The first op of type ``cls`` inside nested Compose / RandomApply transforms."""
    if isinstance(transform, cls):
        return transform
    for child in getattr(transform, "transforms", []):
        found = find(child, cls)
        if found is not None:
            return found
    return None


def record_params(op) -> list[dict]:
    """Make ``op`` record the parameters it draws: wraps the instance's make_params, which
    Transform.forward calls once per call."""
    seen: list[dict] = []
    draw = op.make_params

    def recording(flat_inputs):
        params = draw(flat_inputs)
        seen.append(params)
        return params

    op.make_params = recording
    return seen


def assert_rate(count: int, n: int, p: float) -> None:
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(count / n - p) < 5 * sigma, f"rate {count / n:.4f}, expected {p} +- {5 * sigma:.4f}"


def noise(h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8)


def constant(rgb, side: int = 16) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, side, side).contiguous()


# A crop that is the whole image at the output size, so the geometric step is the identity.
IDENTITY_CROP = dict(size=16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
PLAIN = ViewSpec(**IDENTITY_CROP, flip_prob=0, jitter_prob=0, grayscale_prob=0, blur_prob=0)


# --- shapes and reference values ---------------------------------------------------------

@SEMANTICS
@pytest.mark.parametrize("hw,size", [((40, 50), 32), ((300, 260), 224), ((20, 24), 32), ((64, 64), 16)])
def test_view_shape_dtype_and_range(hw, size, semantics):
    torch.manual_seed(0)
    for spec in byol_view_specs(size, semantics=semantics):
        out = view_transform(spec)(noise(*hw))
        assert out.shape == (3, size, size) and out.dtype == torch.float32
        x = denormalize(out)
        assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5


@SEMANTICS
def test_normalisation_reference_values(semantics):
    # The identity crop at the image's size: an exact identity in both semantics (official: one
    # box, the whole image, and bicubic weights (0, 1, 0, 0) at scale 1).
    torch.manual_seed(0)
    img = noise(16, 16)
    expected = (img.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(3, 1, 1)
    out = view_transform(replace(PLAIN, semantics=semantics))(img)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(denormalize(out), img.float() / 255, atol=1e-6, rtol=0)


@SEMANTICS
def test_solarize_reference_values(semantics):
    # x <- 1 - x where x >= 0.5 (docs/method.md §3), on the float [0, 1] image: 128/255 flips, 127 not.
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    out = denormalize(view_transform(replace(PLAIN, solarize_prob=1.0, semantics=semantics))(ramp))
    x = ramp.float() / 255
    torch.testing.assert_close(out, torch.where(x >= 0.5, 1 - x, x), atol=1e-6, rtol=0)


def test_pipeline_order_and_parameters():
    t1, t2 = byol_view_specs(224, semantics=TV)
    ops1, ops2 = view_transform(t1).transforms, view_transform(t2).transforms
    names = [type(op).__name__ for op in ops2]
    assert names == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype", "RandomApply", "RandomGrayscale",
        "RandomApply", "RandomSolarize", "Clamp01", "Normalize",
    ]
    assert "RandomSolarize" not in [type(op).__name__ for op in ops1]  # T never solarizes
    crop = ops2[0]
    assert crop.interpolation == v2.InterpolationMode.BICUBIC and crop.antialias
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    jitter = find(ops2[3], v2.ColorJitter)
    assert (jitter.brightness, jitter.contrast) == ((0.6, 1.4), (0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.8, 1.2)) and jitter.hue == (-0.1, 0.1)
    assert ops2[3].p == 0.8 and ops2[4].p == 0.2 and ops2[5].p == 0.1 and ops2[6].p == 0.2
    blur = find(ops2[5], v2.GaussianBlur)
    assert blur.kernel_size == (23, 23) and list(blur.sigma) == [0.1, 2.0]  # paper: 23x23 at 224
    assert ops2[6].threshold == 0.5
    # 32-px preset: no blur in either view.
    for spec in byol_view_specs(32, blur=False, semantics=TV):
        assert find(view_transform(spec), v2.GaussianBlur) is None


def test_official_pipeline_order():
    from byol.augment.views import CropFlip, OfficialPhotometric

    t1, t2 = byol_view_specs(224)  # official: the default
    assert t1.semantics == t2.semantics == "official"
    ops = view_transform(t2).transforms
    assert [type(op) for op in ops] == [CropFlip, OfficialPhotometric, v2.Normalize]
    assert ops[1].spec == t2 and ops[1].radius == 11  # 23x23 at 224, as torchvision's
    assert list(ops[2].mean) == list(t2.mean) and list(ops[2].std) == list(t2.std)


def test_blur_kernel_size():
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(16) == 3
    assert blur_kernel_size(100) == 11  # 10 -> next odd
    assert blur_kernel_size(96) == 9
    assert blur_kernel_size(30) == 3  # 0.1 * 30 is 3.0000000000000004
    with pytest.raises(ValueError):
        blur_kernel_size(0)


# --- per image, per view ----------------------------------------------------------------

def test_each_image_of_a_batch_gets_its_own_parameters():
    torch.manual_seed(0)
    t = view_transform(byol_view_specs(16, semantics=TV)[0])
    boxes = record_params(find(t, v2.RandomResizedCrop))
    img = noise(64, 64)
    out = torch.stack([t(img) for _ in range(16)]).flatten(1)
    dist = torch.cdist(out, out) + torch.eye(16) * 1e9
    assert dist.min() > 1e-3  # 16 pairwise different outputs of one image
    assert len({tuple(b.values()) for b in boxes}) == 16  # and 16 different crop boxes


def test_crop_box_distribution():
    torch.manual_seed(0)
    crop = find(view_transform(ViewSpec(size=16, semantics=TV)), v2.RandomResizedCrop)
    img = noise(100, 100)
    boxes = [crop.make_params([img]) for _ in range(500)]
    area = torch.tensor([b["height"] * b["width"] / 1e4 for b in boxes])
    ratio = torch.tensor([b["width"] / b["height"] for b in boxes])
    assert len({tuple(b.values()) for b in boxes}) > 450
    # Bounds of docs/method.md §3 (slack for the rounding of w and h to whole pixels).
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.15 and area.max() > 0.9
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4


@SEMANTICS
def test_two_views_are_independent(semantics):
    torch.manual_seed(0)
    img = noise(40, 50)
    v1, v2_ = two_view_transform(*byol_view_specs(32, semantics=semantics))(img)
    assert v1.shape == v2_.shape == (3, 32, 32)
    assert not torch.allclose(v1, v2_)
    # Even with the same distribution on both sides the draws are independent.
    t = view_transform(ViewSpec(size=32, semantics=semantics))
    a, b = TwoViews(t, t)(img)
    assert not torch.allclose(a, b)


@SEMANTICS
def test_dataloader_batch_has_per_sample_parameters(semantics):
    class Same(Dataset):
        def __init__(self, img, views):
            self.img, self.views = img, views

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return self.views(self.img)

    torch.manual_seed(0)
    views = two_view_transform(*byol_view_specs(16, semantics=semantics))
    v1, v2_ = next(iter(DataLoader(Same(noise(48, 48), views), batch_size=16)))
    for batch in (v1, v2_):
        flat = batch.flatten(1)
        assert (torch.cdist(flat, flat) + torch.eye(16) * 1e9).min() > 1e-3
    assert ((v1 - v2_).flatten(1).abs().amax(1) > 1e-3).all()


# --- rates of the random steps (docs/method.md §3 table) ----------------------------------------

def count(transform, img, predicate, n=N_DRAWS) -> int:
    return sum(bool(predicate(denormalize(transform(img)))) for _ in range(n))


@SEMANTICS
def test_solarize_rate(semantics):
    # A constant 0.8 image stays 0.8 through crop, flip and blur; solarized it becomes 0.2.
    torch.manual_seed(0)
    img = constant((204, 204, 204))
    t1, t2 = byol_view_specs(16, jitter_prob=0.0, grayscale_prob=0.0, semantics=semantics)
    solarized = lambda x: (x - 0.2).abs().max() < 1e-3  # noqa: E731
    unchanged = lambda x: (x - 0.8).abs().max() < 1e-3  # noqa: E731
    assert count(view_transform(t1), img, solarized) == 0
    assert count(view_transform(t1), img, unchanged, n=200) == 200
    assert_rate(count(view_transform(t2), img, solarized), N_DRAWS, 0.2)


@pytest.mark.parametrize("semantics,side", [("official", 24), (TV, 16)])
def test_blur_rate(semantics, side):
    # A 1-pixel checkerboard under the identity crop keeps its variance 0.25 unless blurred.
    # sigma >= 1 here because sigma near 0.1 leaves a 3x3 kernel almost a delta (undetectable).
    # The official kernel radius is int(side / 20): 24 px for a 3x3 kernel (16 px would give none).
    torch.manual_seed(0)
    board = ((torch.arange(side).view(side, 1) + torch.arange(side)) % 2 * 255).to(torch.uint8)
    img = board.expand(3, side, side).contiguous()
    t1, t2 = byol_view_specs(jitter_prob=0.0, grayscale_prob=0.0, blur_sigma=(1.0, 2.0),
                             **dict(IDENTITY_CROP, size=side), semantics=semantics)
    blurred = lambda x: x.var() < 0.1  # noqa: E731
    assert count(view_transform(t1), img, blurred) == N_DRAWS
    assert_rate(count(view_transform(replace(t2, solarize_prob=0.0)), img, blurred), N_DRAWS, 0.1)


@SEMANTICS
def test_grayscale_rate(semantics):
    # Every other step active: only grayscale makes the three channels of a noise image equal.
    torch.manual_seed(0)
    t2 = byol_view_specs(16, semantics=semantics)[1]
    gray = lambda x: (x[0] - x[1]).abs().max() < 1e-5 and (x[1] - x[2]).abs().max() < 1e-5  # noqa: E731
    assert_rate(count(view_transform(t2), noise(24, 24), gray), N_DRAWS, 0.2)


@SEMANTICS
def test_jitter_rate(semantics):
    # A constant colour keeps its exact value through crop, flip and blur unless jittered.
    torch.manual_seed(0)
    img = constant((200, 100, 50))
    base = img.float() / 255
    t1 = byol_view_specs(16, grayscale_prob=0.0, semantics=semantics)[0]
    changed = lambda x: (x - base).abs().max() > 1e-3  # noqa: E731
    assert_rate(count(view_transform(t1), img, changed), N_DRAWS, 0.8)


def test_jitter_order_is_random_per_call():
    # torchvision's v2.ColorJitter.make_params draws fn_idx = randperm(4) on every call and
    # transform() applies the four adjustments in that order. Record the drawn orders through
    # the whole pipeline: all 24 orders occur, each about 1/24 of the time...
    torch.manual_seed(0)
    t = view_transform(ViewSpec(size=16, jitter_prob=1.0, semantics=TV))
    jitter = find(t, v2.ColorJitter)
    drawn = record_params(jitter)
    img = noise(24, 24)
    n = 1200
    for _ in range(n):
        t(img)
    orders = [tuple(p["fn_idx"].tolist()) for p in drawn]
    assert len(orders) == n
    counts = {o: orders.count(o) for o in set(orders)}
    assert len(counts) == 24
    for c in counts.values():
        assert_rate(c, n, 1 / 24)
    # ...and the order matters: the same factors in two orders give different pixels.
    x = img.float() / 255
    params = dict(brightness_factor=1.4, contrast_factor=0.6, saturation_factor=1.2, hue_factor=0.1)
    forward = jitter.transform(x, dict(params, fn_idx=torch.tensor([0, 1, 2, 3])))
    backward = jitter.transform(x, dict(params, fn_idx=torch.tensor([3, 2, 1, 0])))
    assert (forward - backward).abs().max() > 1e-2


# --- specs and validation ------------------------------------------------------------------

def test_byol_view_specs():
    t1, t2 = byol_view_specs(224)
    assert (t1.blur_prob, t1.solarize_prob, t2.blur_prob, t2.solarize_prob) == (1.0, 0.0, 0.1, 0.2)
    assert replace(t1, blur_prob=0.1, solarize_prob=0.2) == t2  # T and T' differ in nothing else
    assert t1 == replace(ViewSpec(), solarize_prob=0.0)
    s1, s2 = byol_view_specs(32, blur=False, brightness=0.8, crop_scale=[0.2, 1.0])
    assert s1.blur_prob == s2.blur_prob == 0.0 and s2.solarize_prob == 0.2
    assert s1.size == s2.size == 32 and s1.brightness == s2.brightness == 0.8
    assert s1.crop_scale == (0.2, 1.0)  # lists (from YAML) become tuples


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("solarize_prob", 1.5, "augment.solarize_prob must be in [0, 1], got 1.5"),
        ("flip_prob", -0.1, "augment.flip_prob"),
        ("jitter_prob", 2.0, "augment.jitter_prob"),
        ("grayscale_prob", 1.01, "augment.grayscale_prob"),
        ("blur_prob", -1.0, "augment.blur_prob"),
        ("size", 0, "augment.size must be > 0, got 0"),
        ("crop_scale", (0.5, 0.1), "augment.crop_scale"),
        ("crop_scale", (0.0, 1.0), "augment.crop_scale"),
        ("crop_scale", (0.5, 1.5), "augment.crop_scale"),
        ("crop_ratio", (4 / 3, 3 / 4), "augment.crop_ratio"),
        ("blur_sigma", (2.0, 0.1), "augment.blur_sigma"),
        ("blur_sigma", (0.0, 1.0), "augment.blur_sigma"),
        ("hue", 0.6, "augment.hue must be in [0, 0.5], got 0.6"),
        ("hue", -0.1, "augment.hue"),
        ("brightness", -0.4, "augment.brightness"),
        ("blur_kernel_fraction", 0.0, "augment.blur_kernel_fraction"),
        ("std", (0.2, 0.0, 0.2), "augment.std"),
        ("mean", (0.5, 0.5), "augment.mean"),
        ("semantics", "tensorflow", "augment.semantics must be one of official, torchvision, got 'tensorflow'"),
    ],
)
def test_view_spec_validation(field, value, message):
    with pytest.raises(ValueError) as info:
        ViewSpec(**{field: value})
    assert message in str(info.value)


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="augment.flip_prob"):
        byol_view_specs(32, flip_prob=3.0)


# --- evaluation transform -------------------------------------------------------------------

@SEMANTICS
def test_eval_transform_shape_and_determinism(semantics):
    torch.manual_seed(0)
    img = noise(300, 260)
    t = eval_transform(224, semantics=semantics)
    out = t(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(t(img), out, atol=0, rtol=0)
    assert eval_transform(32, crop_fraction=1.0, semantics=semantics)(noise(40, 50)).shape == (3, 32, 32)


@SEMANTICS
def test_eval_transform_reference_values(semantics):
    # 224 of 256 (docs/method.md §5): a 256x256 image is not resized, only centre-cropped (official:
    # the centre square of int(0.875 * 256) = 224 at offset (256 - 224 + 1) // 2 = 16, resized at scale 1).
    torch.manual_seed(0)
    img = noise(256, 256)
    expected = view_transform(PLAIN)  # normalise only
    out = eval_transform(224, semantics=semantics)(img)
    crop = img[:, 16:240, 16:240]
    torch.testing.assert_close(denormalize(out), crop.float() / 255, atol=1e-6, rtol=0)
    small = noise(16, 16)
    torch.testing.assert_close(eval_transform(16, crop_fraction=1.0, semantics=semantics)(small), expected(small),
                               atol=1e-6, rtol=0)


def test_eval_transform_semantics_differ_and_have_their_own_repr():
    # 300 x 260: torchvision resizes the shorter side to 256, then crops 224; official crops the
    # centre 227 x 227 square (int(0.875 * 260)), then resizes it to 224.
    torch.manual_seed(0)
    img = noise(300, 260)
    tv, official = eval_transform(224), eval_transform(224, semantics="official")  # torchvision: the default
    assert (official(img) - tv(img)).abs().max() > 0.1
    assert repr(official) != repr(tv) and "crop_fraction=0.875" in repr(official)  # feature caches key on it


@pytest.mark.parametrize("kwargs", [dict(size=0), dict(size=32, crop_fraction=0.0), dict(size=32, crop_fraction=1.5),
                                    dict(size=32, semantics="tf")])
def test_eval_transform_validation(kwargs):
    with pytest.raises(ValueError):
        eval_transform(**kwargs)


def test_crop_flip_draws_and_returns_what_the_v2_pipeline_does():
    """CropFlip (the loader's crop + flip) == v2.Compose(geometric_ops(spec)): same pixels from the
    same seed, and the RNG left in the same state, for images of several shapes."""
    from byol.augment.views import CropFlip, geometric_ops

    for size, shape in ((32, (3, 32, 32)), (16, (3, 40, 24)), (24, (3, 17, 50))):
        spec = ViewSpec(size=size, semantics=TV)
        fast, ref = CropFlip(spec), v2.Compose(geometric_ops(spec))
        img = torch.randint(0, 256, shape, dtype=torch.uint8)
        flips = 0
        for seed in range(40):
            torch.manual_seed(seed)
            a, after_a = fast(img), torch.rand(1)
            torch.manual_seed(seed)
            b, after_b = ref(img), torch.rand(1)
            assert a.dtype == torch.uint8 and a.shape == (3, size, size)
            assert torch.equal(a, b) and torch.equal(after_a, after_b)
            torch.manual_seed(seed)
            no_flip = CropFlip(ViewSpec(size=size, flip_prob=0.0, semantics=TV))(img)
            flips += not torch.equal(a, no_flip)
        assert 5 < flips < 35  # p = 0.5: both branches were taken
