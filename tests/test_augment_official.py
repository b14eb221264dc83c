"""The official augmentation semantics (docs/fidelity.md) against values recorded by running the
authors' released code (tests/fixtures/official/augment.npz, written by
tools/official_reference/make_augment_fixtures.py; read here with numpy only).

Measured on CPU float32 (max |ours - release|): crop boxes and the bicubic resize are bit-exact
(7000 boxes on 7 image sizes; 6 resizes, up and down, non-square; the crop + resize + /255 + clip
of views and of the evaluation crop end to end); brightness, solarize and grayscale <= 6e-8,
contrast <= 1.2e-7, saturation <= 5.1e-7, hue <= 6.6e-7 (both ours and torchvision's function),
blur <= 3.6e-7, the whole colour stage and the whole view <= 1.2e-6. Hence exact for the geometry,
COLOUR_ATOL = 2e-6 for single ops, PIPELINE_ATOL = 1e-5 for whole stages (after normalisation,
values are ~4.5x larger). Each "differs" test shows the fixture test failing if the op were
torchvision's: the torchvision op with the same parameter misses the release by far more than the
tolerance.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from byol.augment import batched as B
from byol.augment import byol_view_specs, eval_transform, official
from byol.augment.batched import BatchedPhotometric, PhotometricParams
from byol.augment.views import CropFlip, OfficialCenterCrop, OfficialPhotometric, ViewSpec
from byol.presets import IMAGENET_MEAN, IMAGENET_STD
from conftest import TINY

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "official" / "augment.npz")
COLOUR_ATOL = 2e-6
PIPELINE_ATOL = 1e-5


def fix(name: str) -> np.ndarray:
    return FIXTURE[name]


def nchw(name: str) -> torch.Tensor:
    """A fixture's NHWC (or HWC) array as a torch NCHW tensor."""
    a = torch.from_numpy(np.ascontiguousarray(fix(name)))
    return (a[None] if a.ndim == 3 else a).permute(0, 3, 1, 2).contiguous()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- the crop box (dataset._decode_and_random_crop) -------------------------------------------

def test_crop_box_matches_the_release():
    u = fix("crop_u")
    for (h, w), boxes in zip(fix("crop_sizes").tolist(), fix("crop_boxes")):
        ours = np.array([official.crop_box(h, w, row.tolist()) for row in u])
        assert (ours == boxes).all(), f"{h}x{w}: {(ours != boxes).any(1).sum()} boxes differ"
        assert h * w < 100 or len({tuple(b) for b in boxes.tolist()}) > 500


def test_crop_box_differs_from_torchvision_on_extreme_images():
    # The release draws once and cuts w or h to the image: on a 32 x 900 image most boxes are as tall
    # as the image and far wider than 4/3. torchvision retries 10 times and then crops the centre at
    # the bounding ratio, so its boxes never leave [3/4, 4/3] (up to rounding).
    (i,) = [k for k, s in enumerate(fix("crop_sizes").tolist()) if s == [32, 900]]
    boxes = fix("crop_boxes")[i]
    release_ratio = boxes[:, 3] / boxes[:, 2]
    assert (release_ratio > 2).mean() > 0.5 and (boxes[:, 2] == 32).mean() > 0.9
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(16, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    img = torch.zeros(3, 32, 900, dtype=torch.uint8)
    tv = [crop.make_params([img]) for _ in range(500)]
    assert max(b["width"] / b["height"] for b in tv) < 1.4


def test_crop_box_edges_and_tiny_images():
    one = 1 - 2 ** -24
    # u = 0: the smallest area at the smallest ratio, at the top-left corner
    top, left, h, w = official.crop_box(100, 100, [0, 0, 0, 0])
    assert (top, left) == (0, 0) and (w, h) == (round(math.sqrt(800 * 0.75)), round(math.sqrt(800 / 0.75)))
    top, left, h, w = official.crop_box(100, 100, [one, one, one, one])
    assert (top + h, left + w) == (100, 100)  # the last offsets reach the far edges
    for hw in ((1, 1), (2, 1), (1, 7)):  # the release would crop nothing here; a box of >= 1 pixel
        for u in ([0, 0, 0, 0], [one] * 4, [0.5] * 4):
            top, left, h, w = official.crop_box(*hw, u)
            assert 1 <= h <= hw[0] and 1 <= w <= hw[1] and top + h <= hw[0] and left + w <= hw[1]
    with pytest.raises(ValueError, match="non-empty"):
        official.crop_box(0, 5, [0.5] * 4)


# --- the resize (tf.image.resize, BICUBIC) ---------------------------------------------------------

def resize_pairs():
    for i in range(int(fix("resize_count"))):
        yield nchw(f"resize_in_{i}"), nchw(f"resize_out_{i}")


# The resize is TensorFlow's weights applied as matrix products: equal up to the order of the float32
# sums (measured: 6e-5 at most on 0..255 values; a wrong weight, tap or centre is off by > 1).
RESIZE_ATOL = 2e-4


def test_resize_matches_tensorflow():
    for x, expected in resize_pairs():
        ours = official.resize_bicubic(x, tuple(expected.shape[-2:]))
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected, atol=RESIZE_ATOL, rtol=0)
    # float, not clamped: the release's bicubic overshoots 0..255
    outs = torch.cat([e.flatten() for _, e in resize_pairs()])
    assert outs.min() < -5 and outs.max() > 260


def test_resize_differs_from_torchvision():
    # torchvision semantics: antialiased bicubic (a = -0.75), rounded to uint8; without antialias too
    for x, expected in resize_pairs():
        size = list(expected.shape[-2:])
        for antialias in (True, False):
            tv = TF.resize(x, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=antialias)
            assert maxdiff(tv, expected) > 1.0  # in 0..255 units, vs RESIZE_ATOL


def test_resize_taps():
    index, weight = official.resize_taps(7, 3)
    assert index.shape == weight.shape == (4, 3) and index.dtype == torch.int64
    torch.testing.assert_close(weight.sum(0), torch.ones(3), atol=1e-6, rtol=0)
    assert official.resize_taps(7, 3) is official.resize_taps(7, 3)  # cached
    index, weight = official.resize_taps(5, 5)  # scale 1: the identity
    assert torch.equal(index[1], torch.arange(5)) and torch.equal(weight[1], torch.ones(5))
    assert (weight[[0, 2, 3]] == 0).all()
    with pytest.raises(ValueError):
        official.resize_taps(0, 3)


# --- crop + resize + /255 + clip, views and evaluation, end to end ---------------------------------

def geo_images():
    for i in range(3):
        yield i, torch.from_numpy(fix(f"geo_img_{i}")).permute(2, 0, 1).contiguous()


def at_pixels(x: torch.Tensor) -> torch.Tensor:
    """The fixture's 512 sampled pixels of a [3, 224, 224] image, as [512, 3]."""
    yx = torch.from_numpy(fix("geo_yx")).long()
    return x[:, yx[:, 0], yx[:, 1]].T


def test_view_crop_and_resize_match_the_release_end_to_end():
    for i, img in geo_images():
        for j in (2 * i, 2 * i + 1):
            box = official.crop_box(img.shape[1], img.shape[2], fix("geo_u")[j].tolist())
            ours = official.crop_resize(img, box, 224)
            assert ours.dtype == torch.float32 and 0 <= ours.min() and ours.max() <= 1
            torch.testing.assert_close(at_pixels(ours), torch.from_numpy(fix("geo_out")[j]), atol=1e-6, rtol=0)


def test_view_crop_and_resize_differ_from_torchvision():
    for i, img in geo_images():
        box = official.crop_box(img.shape[1], img.shape[2], fix("geo_u")[2 * i].tolist())
        tv = TF.resized_crop(img, *box, size=[224, 224], interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True).float() / 255
        assert maxdiff(at_pixels(tv), torch.from_numpy(fix("geo_out")[2 * i])) > 0.01


def test_eval_crop_matches_the_release_end_to_end():
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3), torch.tensor(IMAGENET_STD).view(1, 3)
    for i, img in geo_images():
        assert official.center_crop_box(img.shape[1], img.shape[2]) == tuple(fix(f"eval_box_{i}").tolist())
        expected = torch.from_numpy(fix("eval_out")[i])
        torch.testing.assert_close(at_pixels(OfficialCenterCrop(224, 0.875)(img)), expected, atol=1e-6, rtol=0)
        ours = eval_transform(224, semantics="official")(img)  # + normalisation
        torch.testing.assert_close(at_pixels(ours), (expected - mean) / std, atol=1e-6, rtol=0)
        tv = eval_transform(224)(img)  # torchvision semantics: resize the shorter side, then crop
        assert maxdiff(at_pixels(tv), (expected - mean) / std) > 0.05


def test_center_crop_box():
    assert official.center_crop_box(256, 256) == (16, 16, 224, 224)
    assert official.center_crop_box(375, 500) == (24, 86, 328, 328)  # int(0.875 * 375) = 328
    assert official.center_crop_box(32, 32, 1.0) == (0, 0, 32, 32)
    assert official.center_crop_box(1, 1) == (0, 0, 1, 1)  # int(0.875) = 0 pixels: made 1


# --- colour ops ---------------------------------------------------------------------------------

COLOUR = [("brightness", official.adjust_brightness, "delta"), ("contrast", official.adjust_contrast, "factor"),
          ("saturation", official.adjust_saturation, "factor"), ("hue", B.adjust_hue, "delta")]


@pytest.mark.parametrize("name,fn,param", COLOUR, ids=[c[0] for c in COLOUR])
def test_colour_op_matches_the_release(name, fn, param):
    x, expected = nchw("colour_x"), nchw(f"colour_{name}")
    ours = fn(x, torch.from_numpy(fix(f"colour_{name}_{param}")))
    torch.testing.assert_close(ours, expected, atol=COLOUR_ATOL, rtol=0)
    assert maxdiff(ours, x) > 0.05  # the parameters did something


def test_hue_is_the_same_arithmetic_in_both_semantics():
    x, expected = nchw("colour_x"), nchw("colour_hue")
    tv = torch.stack([TF.adjust_hue(x[i], float(d)) for i, d in enumerate(fix("colour_hue_delta"))])
    torch.testing.assert_close(tv, expected, atol=COLOUR_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_colour_op_differs_from_torchvision(name):
    # torchvision's op with the same parameter (brightness: the factor 1 + delta), clipped as both clip
    x, expected = nchw("colour_x"), nchw(f"colour_{name}").clamp(0, 1)
    (_, _, param) = next(c for c in COLOUR if c[0] == name)
    value = torch.from_numpy(fix(f"colour_{name}_{param}"))
    tv = getattr(B, f"adjust_{name}")(x, 1 + value if name == "brightness" else value)
    assert maxdiff(tv, expected) > 0.02


def test_grayscale_solarize_and_normalisation_match_the_release():
    x = nchw("colour_x")
    torch.testing.assert_close(B.rgb_to_grayscale(x).expand_as(x), nchw("colour_gray"), atol=COLOUR_ATOL, rtol=0)
    torch.testing.assert_close(B.solarize(x), nchw("colour_solarize"), atol=0, rtol=0)
    torch.testing.assert_close(B.normalize(nchw("norm_x"), IMAGENET_MEAN, IMAGENET_STD), nchw("norm_out"),
                               atol=COLOUR_ATOL, rtol=0)


def test_saturation_edge_cases():
    # grey (spread 0) and black (v = 0) pixels keep their value; factor 0 makes an image grey
    x = torch.tensor([[0.3, 0.3, 0.3], [0.0, 0.0, 0.0], [0.9, 0.2, 0.5]]).T.reshape(1, 3, 1, 3)
    out = official.adjust_saturation(x, torch.tensor([1.7]))
    assert torch.equal(out[..., :2], x[..., :2]) and torch.isfinite(out).all()
    assert torch.equal(out[0, :, 0, 2], torch.tensor([0.9, 0.0, 0.9 - 0.4 / 0.7 * 0.9]))  # s capped at 1
    grey = official.adjust_saturation(x, torch.tensor([0.0]))
    assert torch.equal(grey, x.amax(dim=1, keepdim=True).expand_as(x))


# --- blur -----------------------------------------------------------------------------------------

def test_blur_matches_the_release():
    x = nchw("blur_x")
    radii = set()
    for k, sigma, expected in zip(fix("blur_kernel_size"), fix("blur_sigma"), fix("blur_out")):
        radius = int(k / 2)  # the release's radius for its kernel_size (side / 10)
        radii.add(radius)
        ours = official.gaussian_blur(x, torch.tensor([sigma]), radius)
        torch.testing.assert_close(ours, nchw_of(expected), atol=COLOUR_ATOL, rtol=0)
    assert radii == {0, 1, 2, 11}


def nchw_of(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))[None].permute(0, 3, 1, 2)


def test_blur_differs_from_torchvision():
    # torchvision pads by reflection (and its kernel has at least 3 taps): the borders differ
    x = nchw("blur_x")
    for k, sigma, expected in zip(fix("blur_kernel_size"), fix("blur_sigma"), fix("blur_out")):
        radius = int(k / 2)
        if radius == 0 or sigma < 0.5:
            continue
        tv = B.gaussian_blur(x, torch.tensor([sigma]), 2 * radius + 1)
        assert maxdiff(tv, nchw_of(expected)) > 0.05


def test_blur_radius():
    for size in range(1, 513):
        assert official.blur_radius(size, 0.1) == int(size / 10.0 / 2)  # the release's kernel_size / 2
    assert [official.blur_radius(s, 0.1) for s in (224, 32, 20, 19, 16)] == [11, 1, 1, 0, 0]
    x = torch.rand(2, 3, 5, 5)
    assert official.gaussian_blur(x, torch.ones(2), 0) is x
    with pytest.raises(ValueError):
        official.gaussian_blur(x, torch.ones(2), -1)


# --- the colour stage and the whole view, with the parameters the release's keys drew ---------------

def params_of(prefix: str, n: int, suffix: str = "") -> PhotometricParams:
    """The fixture's recorded draws as PhotometricParams (blur and solarize off unless recorded)."""
    def get(name, default):
        key = f"{prefix}_{name}{suffix}"
        return torch.from_numpy(fix(key)) if key in FIXTURE.files else default

    off = torch.zeros(n, dtype=torch.bool)
    return PhotometricParams(
        jitter=get("jitter", off), order=get("order", None).long(), brightness=get("brightness", None),
        contrast=get("contrast", None), saturation=get("saturation", None), hue=get("hue", None),
        grayscale=get("gray", off), blur=get("blur", off), sigma=get("sigma", torch.ones(n)),
        solarize=get("solarize", off))


def per_image_params(p: PhotometricParams, i: int) -> dict:
    names = ("jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma", "solarize")
    return dict({n: getattr(p, n)[i].item() for n in names}, order=p.order[i].tolist())


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


def jitter_spec() -> ViewSpec:
    """Our T with blur off, checked equal to the release's colour settings the fixture used."""
    cfg = {k[len("jitter_cfg_"):]: float(fix(k)) for k in FIXTURE.files if k.startswith("jitter_cfg_")}
    spec = replace(byol_view_specs(8)[0], blur_prob=0.0)
    assert (cfg["brightness"], cfg["contrast"], cfg["saturation"], cfg["hue"]) == (
        spec.brightness, spec.contrast, spec.saturation, spec.hue)
    assert (cfg["color_jitter_prob"], cfg["to_grayscale_prob"]) == (spec.jitter_prob, spec.grayscale_prob)
    return spec


def test_colour_stage_matches_the_release_in_every_order():
    x = nchw("jitter_x").float() / 255
    expected = nchw("jitter_out")
    p = params_of("jitter", len(x))
    on = p.jitter.tolist()
    assert len({tuple(o) for o, j in zip(p.order.tolist(), on) if j}) == 24  # every order, jittered
    assert not all(on) and p.grayscale.any() and not p.grayscale.all()
    spec = jitter_spec()
    reference = OfficialPhotometric(spec)
    ours = torch.stack([reference.transform(x[i], per_image_params(p, i)) for i in range(len(x))])
    torch.testing.assert_close(ours, expected, atol=PIPELINE_ATOL, rtol=0)
    for compact in (True, False):
        batched = unnormalize(BatchedPhotometric(spec, compact=compact).apply(x, p))
        torch.testing.assert_close(batched, expected, atol=PIPELINE_ATOL, rtol=0)


def view_spec(side: int) -> ViewSpec:
    """Our T' at ``side``, checked equal to the release's view-2 settings the fixture used."""
    spec = byol_view_specs(side)[1]
    assert float(fix("view_cfg_apply_prob")) == spec.blur_prob
    assert (float(fix("view_cfg_sigma_min")), float(fix("view_cfg_sigma_max"))) == spec.blur_sigma
    assert float(fix("view_cfg_blur_divider")) == 1 / spec.blur_kernel_fraction
    assert float(fix("view_cfg_solarize_apply_prob")) == spec.solarize_prob
    assert float(fix("view_cfg_solarize_threshold")) == 0.5
    assert float(fix("view_cfg_colour_color_jitter_prob")) == spec.jitter_prob
    return spec


@pytest.mark.parametrize("side", [24, 40])
def test_whole_view_matches_the_release(side):
    """flip (the workers' CropFlip flips after the resize, as the release does), then rows 3-6."""
    x = nchw(f"view_x_{side}").float() / 255
    expected = nchw(f"view_out_{side}")
    flip = torch.from_numpy(fix(f"view_flip_{side}"))
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    p = params_of("view", len(x), f"_{side}")
    spec = view_spec(side)
    reference = OfficialPhotometric(spec)
    ours = torch.stack([reference.transform(x[i], per_image_params(p, i)) for i in range(len(x))])
    torch.testing.assert_close(ours, expected, atol=PIPELINE_ATOL, rtol=0)
    for compact in (True, False):
        batched = unnormalize(BatchedPhotometric(spec, compact=compact).apply(x, p))
        torch.testing.assert_close(batched, expected, atol=PIPELINE_ATOL, rtol=0)
    if side == 24:  # every step both taken and skipped
        for mask in (flip, p.jitter, p.grayscale, p.blur, p.solarize):
            assert mask.any() and not mask.all()
    assert p.blur.any()


def test_whole_view_differs_from_torchvision():
    # torchvision semantics with the same draws (brightness as the factor 1 + delta), on the uint8 input
    side = 24
    x8 = nchw(f"view_x_{side}")
    flip = torch.from_numpy(fix(f"view_flip_{side}"))
    x8 = torch.where(flip.view(-1, 1, 1, 1), x8.flip(-1), x8)
    p = params_of("view", len(x8), f"_{side}")
    p.brightness = 1 + p.brightness
    tv = unnormalize(BatchedPhotometric(replace(view_spec(side), semantics="torchvision")).apply(x8, p))
    assert maxdiff(tv, nchw(f"view_out_{side}")) > 0.05


# --- the draws: per image and per view, the release's distributions ------------------------------

def test_official_crop_flip_draws_from_the_global_rng():
    spec = ViewSpec(size=24)
    img = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flips = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out = CropFlip(spec)(img)
        torch.manual_seed(seed)
        box = official.crop_box(40, 30, torch.rand(4).tolist())
        expected = official.crop_resize(img, box, 24)
        flipped = bool(torch.rand(1) < 0.5)
        assert out.dtype == torch.float32 and out.shape == (3, 24, 24)
        assert torch.equal(out, expected.flip(-1) if flipped else expected)
        flips += flipped
    assert 5 < flips < 25


def test_official_crop_box_distribution():
    torch.manual_seed(0)
    boxes = [official.crop_box(100, 100, torch.rand(4).tolist()) for _ in range(2000)]
    area = torch.tensor([h * w / 1e4 for _, _, h, w in boxes])
    ratio = torch.tensor([w / h for _, _, h, w in boxes])
    assert area.min() >= 0.07 and area.max() <= 1.0 and area.min() < 0.1
    assert ratio.min() >= 0.7 and ratio.max() <= 1.4
    # one draw, cut to the image: sqrt(area * 4/3) > 100 for area > 0.75, so a tenth or so of
    # the boxes span the whole width (torchvision would redraw them)
    assert 0.05 < np.mean([w == 100 for *_, w in boxes]) < 0.25
    assert np.mean([h * w / 1e4 for _, _, h, w in boxes]) == pytest.approx(0.54 - 0.03, abs=0.03)


def test_official_draws_are_per_call_in_the_reference_path():
    torch.manual_seed(0)
    photometric = OfficialPhotometric(ViewSpec(size=16, jitter_prob=1.0))
    drawn = [photometric.make_params() for _ in range(1200)]
    orders = {tuple(d["order"]) for d in drawn}
    assert len(orders) == 24
    for name, low, high in (("brightness", -0.4, 0.4), ("contrast", 0.6, 1.4), ("saturation", 0.8, 1.2),
                            ("hue", -0.1, 0.1), ("sigma", 0.1, 2.0)):
        values = torch.tensor([d[name] for d in drawn])
        assert low <= values.min() < low + 0.02 and high - 0.02 < values.max() <= high
    assert all(d["jitter"] for d in drawn)
    assert 0.1 < np.mean([d["grayscale"] for d in drawn]) < 0.3


def test_semantics_reaches_both_paths_from_the_config():
    from byol.config import load_config
    from byol.data.pipeline import DeviceViews
    from byol.data.transforms import make_eval_transform, make_views, view_specs

    img = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    for semantics, dtype in (("official", torch.float32), ("torchvision", torch.uint8)):
        aug = load_config(None, ["augment.preset=byol32", "augment.size=16", f"augment.semantics={semantics}"]).augment
        assert {s.semantics for s in view_specs(aug)} == {semantics}
        v1, v2_ = make_views(aug)(img)  # batched: the workers' crops
        assert v1.dtype == v2_.dtype == dtype and v1.shape == (3, 16, 16)
        d1, _ = DeviceViews(aug, seed=0)(v1[None], v2_[None], step=0)
        assert d1.dtype == torch.float32 and d1.shape == (1, 3, 16, 16)
        reference = make_views(replace(aug, backend="reference"))(img)
        assert all(v.dtype == torch.float32 and v.shape == (3, 16, 16) for v in reference)
        tf = make_eval_transform(aug)
        assert isinstance(tf.transforms[0], OfficialCenterCrop) == (semantics == "official")
    assert load_config(None, []).augment.semantics == "official"


# --- end to end: pretraining trains and resumes bitwise in official semantics ------------------------

def _pretrain_args(tmp_path, backend: str, name: str, *extra: str) -> list[str]:
    # 24 px with the byol preset: blur on (radius 1); 40 shapes, 20% held out (the official
    # evaluation crop feeds the final kNN), batch 8 -> 4 steps an epoch, 2 epochs
    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet18.yaml"
    return ["pretrain", "--config", str(config), *TINY, "augment.preset=byol", "augment.size=24",
            "augment.semantics=official", f"augment.backend={backend}", "data.dataset=shapes",
            "data.shapes_size=40", "data.val_fraction=0.2", f"train.out_dir={tmp_path}", f"train.name={name}",
            "train.checkpoint_every=100", *extra]


@pytest.mark.parametrize("backend", ["batched", "reference"])
def test_pretrain_official_semantics_trains_and_resumes_bitwise(tmp_path, backend, capsys):
    import json

    from byol.cli import main
    from byol.train.checkpoint import find_checkpoint, load_checkpoint

    assert main(_pretrain_args(tmp_path, backend, "full")) == 0
    assert main(_pretrain_args(tmp_path, backend, "split", "train.max_steps=3")) == 0  # inside epoch 0
    assert main(["pretrain", "--resume", str(tmp_path / "split")]) == 0
    a, b = (load_checkpoint(find_checkpoint(tmp_path / n)) for n in ("full", "split"))
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = {n: [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("full", "split")}
    losses = {n: [r["loss"] for r in rs if "loss" in r] for n, rs in rows.items()}
    assert losses["full"] == losses["split"] and len(losses["full"]) == 8
    assert all(math.isfinite(v) for v in losses["full"])
    assert "val_knn_top1" in rows["full"][-1]  # the final evaluation ran on official centre crops
    saved = (tmp_path / "full" / "config.yaml").read_text()
    assert "semantics: official" in saved and f"backend: {backend}" in saved and "size: 24" in saved
