"""The batched photometric path (byol.augment.batched) against the reference path (views.py).

Op by op and for the whole stage, with fixed per-sample parameters, the batched path must give
the pixels of torchvision.transforms.v2 on each image alone. Tolerances, measured on CPU
float32: brightness, hue and solarize are bit-exact; contrast, saturation and grayscale differ
by <= 2e-7 (torchvision's ``add_(alpha=)`` rounds differently); blur by <= 1.2e-6 at 23x23
(separable passes sum in another order than torchvision's 2-D kernel). Hence atol 1e-6 for the
colour ops and 1e-5 for blur and the whole pipeline (which contains blur).

The official semantics (docs/fidelity.md) is compared the same way with its per-image reference
(``views.OfficialPhotometric``), at the same tolerance: brightness, contrast, saturation and blur are
the same functions on a batch of one; hue and grayscale differ from torchvision's functions by the
amounts above. The ops themselves are proved against the release in tests/test_augment_official.py.

Distributions are checked within ONE batch, so that a per-batch draw (one parameter for all
samples) fails: |rate - p| < 5 sigma, sigma = sqrt(p (1 - p) / n), as in test_augment_views.py.
"""
from __future__ import annotations

import math
from dataclasses import replace
from itertools import permutations

import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from byol.augment import ViewSpec, byol_view_specs, photometric_ops
from byol.augment import batched as B
from byol.augment.batched import BatchedPhotometric, PhotometricParams
from byol.augment.views import OfficialPhotometric

N = 2000
TV = "torchvision"
SEMANTICS = pytest.mark.parametrize("semantics", ["official", TV])
COLOUR_ATOL = 1e-6
HUE_ATOL = BLUR_ATOL = PIPELINE_ATOL = 1e-5


def images(n: int, side: int, seed: int) -> torch.Tensor:
    """Random float images in [0, 1], with some grey pixels (hue/saturation edge cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g)
    x[: n // 4, 1:] = x[: n // 4, :1]
    return x


def per_image(fn, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return torch.stack([fn(x[i], params[i].item()) for i in range(len(x))])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_rate(count: int, n: int, p: float) -> None:
    sigma = math.sqrt(p * (1 - p) / n)
    assert 0 < count < n, f"{count} of {n}: drawn once per batch, not per sample?"
    assert abs(count / n - p) < 5 * sigma, f"rate {count / n:.4f}, expected {p} +- {5 * sigma:.4f}"


# --- op by op, per-sample parameters vs torchvision on each image ---------------------------

@pytest.mark.parametrize("name,low,high", [
    ("brightness", 0.0, 2.0), ("contrast", 0.0, 2.0), ("saturation", 0.0, 2.0), ("hue", -0.5, 0.5),
])
def test_colour_ops_match_torchvision(name, low, high):
    x = images(32, 12, seed=1)
    factor = low + (high - low) * torch.rand(32, generator=gen(2))
    ours = getattr(B, f"adjust_{name}")(x, factor)
    ref = per_image(getattr(TF, f"adjust_{name}"), x, factor)
    torch.testing.assert_close(ours, ref, atol=HUE_ATOL if name == "hue" else COLOUR_ATOL, rtol=0)
    assert (ours - x).abs().amax() > 0.05  # the parameters did something


def test_grayscale_solarize_normalize_match_torchvision():
    x = images(16, 9, seed=3)
    gray = B.rgb_to_grayscale(x).expand_as(x)
    torch.testing.assert_close(gray, torch.stack([TF.rgb_to_grayscale(i, 3) for i in x]), atol=COLOUR_ATOL, rtol=0)
    torch.testing.assert_close(B.solarize(x), torch.stack([TF.solarize(i, 0.5) for i in x]), atol=0, rtol=0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = torch.stack([TF.normalize(i, list(mean), list(std)) for i in x])
    torch.testing.assert_close(B.normalize(x, mean, std), ref, atol=COLOUR_ATOL, rtol=0)


@pytest.mark.parametrize("side,kernel", [(16, 3), (16, 5), (32, 23)])
def test_gaussian_blur_matches_torchvision(side, kernel):
    x = images(16, side, seed=4)
    sigma = 0.1 + 1.9 * torch.rand(16, generator=gen(5))
    ref = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2) for i in range(16)])
    torch.testing.assert_close(B.gaussian_blur(x, sigma, kernel), ref, atol=BLUR_ATOL, rtol=0)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        B.gaussian_blur(x, sigma, 4)


# --- the whole photometric stage with forced parameters -------------------------------------

def reference_stage(spec: ViewSpec, img: torch.Tensor, p: PhotometricParams, i: int) -> torch.Tensor:
    """views.photometric_ops(spec) + Normalize on one uint8 image, with sample i's draws forced
    into each module's ``transform`` (what its forward would do after drawing them)."""
    ops = photometric_ops(spec)
    x = v2.ToDtype(torch.float32, scale=True)(img)
    jitter = ops[0].transforms[0]
    if p.jitter[i]:
        names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        values = (p.brightness, p.contrast, p.saturation, p.hue)
        x = jitter.transform(x, dict({n: v[i].item() for n, v in zip(names, values)}, fn_idx=p.order[i]))
    if p.grayscale[i]:
        x = ops[1].transform(x, dict(num_input_channels=3))
    if p.blur[i]:
        x = ops[2].transforms[0].transform(x, dict(sigma=[p.sigma[i].item()] * 2))
    if p.solarize[i]:
        x = ops[3].transform(x, {})
    x = ops[-1](x)  # Clamp01
    return v2.Normalize(list(spec.mean), list(spec.std))(x)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("size,seed", [(16, 0), (32, 1)])
def test_pipeline_matches_reference_with_forced_parameters(size, seed, compact):
    # T' at probabilities 0.5 so that every step is on for some samples and off for others.
    spec = replace(byol_view_specs(size, semantics=TV)[1], jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5,
                   solarize_prob=0.5)
    aug = BatchedPhotometric(spec, compact=compact)
    n = 48
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen(seed))
    p = aug.sample_params(n, gen(seed + 10))
    ours = aug.apply(x, p)
    ref = torch.stack([reference_stage(spec, x[i], p, i) for i in range(n)])
    assert ours.dtype == torch.float32 and ours.shape == (n, 3, size, size)
    torch.testing.assert_close(ours, ref, atol=PIPELINE_ATOL, rtol=0)
    # The forced draws were varied: mixed masks and several orders.
    for mask in (p.jitter, p.grayscale, p.blur, p.solarize):
        assert 0 < mask.sum() < n
    assert len({tuple(o) for o in p.order.tolist()}) > 10


def official_reference_stage(spec: ViewSpec, x: torch.Tensor, p: PhotometricParams, i: int) -> torch.Tensor:
    """views.OfficialPhotometric(spec) + Normalize on one float [0, 1] image with sample i's draws."""
    names = ("jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "sigma", "solarize")
    params = {n: getattr(p, n)[i].item() for n in names}
    params["order"] = p.order[i].tolist()
    out = OfficialPhotometric(spec).transform(x, params)
    return v2.Normalize(list(spec.mean), list(spec.std))(out)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("size,seed", [(24, 0), (44, 1)])  # blur radius 1 and 2
def test_official_pipeline_matches_its_reference_with_forced_parameters(size, seed, compact):
    spec = replace(byol_view_specs(size)[1], jitter_prob=0.5, grayscale_prob=0.5, blur_prob=0.5, solarize_prob=0.5)
    assert spec.semantics == "official"
    aug = BatchedPhotometric(spec, compact=compact)
    n = 48
    x = torch.rand(n, 3, size, size, generator=gen(seed))  # float crops, as the official workers give
    x[: n // 4, 1:] = x[: n // 4, :1]
    x[n // 4: n // 2, :, :2] = 1.0
    p = aug.sample_params(n, gen(seed + 10))
    ours = aug.apply(x, p)
    ref = torch.stack([official_reference_stage(spec, x[i], p, i) for i in range(n)])
    assert ours.dtype == torch.float32 and ours.shape == (n, 3, size, size)
    torch.testing.assert_close(ours, ref, atol=PIPELINE_ATOL, rtol=0)
    for mask in (p.jitter, p.grayscale, p.blur, p.solarize):
        assert 0 < mask.sum() < n
    assert len({tuple(o) for o in p.order.tolist()}) > 10
    # uint8 input is read as k / 255 (the release's own scaling, a division)
    q = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen(seed))
    torch.testing.assert_close(aug.apply(q, p), aug.apply(q.float() / 255, p), atol=0, rtol=0)


@pytest.mark.parametrize("compact", [True, False])
def test_masked_apply_touches_only_masked_samples(compact):
    x = images(6, 5, seed=6)
    shift = torch.full((6,), 0.25)
    # Sample 0 is grey (hue leaves it as is): mask coloured samples only.
    for mask in (torch.tensor([False, True, False, True, False, True]), torch.zeros(6, dtype=torch.bool)):
        out = B.masked_apply(x, mask, B.adjust_hue, shift, compact=compact)
        torch.testing.assert_close(out[~mask], x[~mask], atol=0, rtol=0)
        torch.testing.assert_close(out[mask], B.adjust_hue(x[mask], shift[mask]), atol=0, rtol=0)
        assert (out[mask] - x[mask]).abs().flatten(1).amax(1).gt(0.05).all()


@SEMANTICS
def test_steps_not_drawn_leave_samples_untouched(semantics):
    # All steps off (probability 0 where the draws would otherwise change every sample).
    spec = ViewSpec(size=16, jitter_prob=0, grayscale_prob=0, blur_prob=0, solarize_prob=0, semantics=semantics)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(0))
    expected = TF.normalize(x.float() / 255, list(spec.mean), list(spec.std))
    torch.testing.assert_close(BatchedPhotometric(spec)(x, gen(1)), expected, atol=1e-6, rtol=0)


def test_input_is_checked():
    aug = BatchedPhotometric(ViewSpec(size=8, semantics=TV))
    with pytest.raises(ValueError, match=r"uint8 \[B, 3, H, W\], got torch.float32"):
        aug(torch.rand(2, 3, 8, 8), gen(0))
    official = BatchedPhotometric(ViewSpec(size=8))
    for bad in (torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8), torch.rand(3, 8, 8)):
        with pytest.raises(ValueError, match=r"float32 in \[0, 1\] \(or uint8\) \[B, 3, H, W\] in official"):
            official(bad, gen(0))


# --- distributions, per sample within one batch ----------------------------------------------

def constant(rgb, n: int = N, side: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, side, side).contiguous()


def unnormalize(out: torch.Tensor, spec: ViewSpec) -> torch.Tensor:
    m, s = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    return out * s + m


def run(spec: ViewSpec, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return unnormalize(BatchedPhotometric(spec)(x, gen(seed)), spec)


@SEMANTICS
def test_solarize_rate_per_sample(semantics):
    # A constant 0.8 image stays 0.8 through blur; solarized it becomes 0.2.
    t1, t2 = byol_view_specs(8, jitter_prob=0.0, grayscale_prob=0.0, semantics=semantics)
    x = constant((204, 204, 204))
    solarized = lambda y: ((y - 0.2).abs().flatten(1).amax(1) < 1e-3).sum().item()  # noqa: E731
    assert solarized(run(t1, x)) == 0  # T never solarizes
    assert_rate(solarized(run(t2, x)), N, 0.2)


@pytest.mark.parametrize("semantics,side", [("official", 20), (TV, 8)])
def test_blur_rate_per_sample(semantics, side):
    # A 1-pixel checkerboard keeps its variance 0.25 unless blurred (sigma >= 1: a clear blur).
    # Official: radius int(side / 20), 1 at 20 px (8 px would not blur).
    t1, t2 = byol_view_specs(side, jitter_prob=0.0, grayscale_prob=0.0, blur_sigma=(1.0, 2.0), semantics=semantics)
    board = ((torch.arange(side).view(side, 1) + torch.arange(side)) % 2 * 255).to(torch.uint8)
    x = board.expand(N, 3, side, side).contiguous()
    blurred = lambda y: (y.flatten(1).var(1) < 0.1).sum().item()  # noqa: E731
    assert blurred(run(t1, x)) == N  # T always blurs
    assert_rate(blurred(run(replace(t2, solarize_prob=0.0), x)), N, 0.1)


@SEMANTICS
def test_grayscale_rate_per_sample(semantics):
    # Every other step active: only grayscale makes the three channels of a noise image equal.
    t2 = byol_view_specs(8, semantics=semantics)[1]
    x = torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8, generator=gen(0))
    y = run(t2, x)
    gray = ((y[:, 0] - y[:, 1]).abs().flatten(1).amax(1) < 1e-5) & ((y[:, 1] - y[:, 2]).abs().flatten(1).amax(1) < 1e-5)
    assert_rate(gray.sum().item(), N, 0.2)


@SEMANTICS
def test_jitter_rate_per_sample(semantics):
    t1 = byol_view_specs(8, grayscale_prob=0.0, semantics=semantics)[0]
    x = constant((200, 100, 50))
    changed = (run(t1, x) - x.float() / 255).abs().flatten(1).amax(1) > 1e-3
    assert_rate(changed.sum().item(), N, 0.8)


def test_brightness_factors_spread_per_sample():
    # Brightness alone on a constant 0.4 image: the output is 0.4 b, so b is read back per sample.
    spec = ViewSpec(size=8, jitter_prob=1.0, contrast=0, saturation=0, hue=0, grayscale_prob=0, blur_prob=0,
                    semantics=TV)
    b = run(spec, constant((102, 102, 102)))[:, 0, 0, 0] / 0.4
    assert 0.6 - 1e-4 <= b.min() < 0.62 and 1.38 < b.max() <= 1.4 + 1e-4
    assert b.std().item() == pytest.approx(0.8 / math.sqrt(12), rel=0.05)  # std of U[0.6, 1.4]
    assert b.mean().item() == pytest.approx(1.0, abs=0.02)


def test_official_brightness_deltas_spread_per_sample():
    # Official brightness adds d ~ U[-0.4, 0.4]: a constant 0.5 image becomes 0.5 + d.
    spec = ViewSpec(size=8, jitter_prob=1.0, contrast=0, saturation=0, hue=0, grayscale_prob=0, blur_prob=0)
    d = run(spec, torch.full((N, 3, 8, 8), 0.5))[:, 0, 0, 0] - 0.5
    assert -0.4 - 1e-4 <= d.min() < -0.38 and 0.38 < d.max() <= 0.4 + 1e-4
    assert d.std().item() == pytest.approx(0.8 / math.sqrt(12), rel=0.05)
    assert d.mean().item() == pytest.approx(0.0, abs=0.02)


@pytest.mark.parametrize("semantics,brightness", [(TV, (0.0, 2.5)), ("official", (-1.5, 1.5))])
def test_sampled_ranges_follow_the_spec(semantics, brightness):
    # torchvision: ColorJitter's factor U[max(0, 1 - 1.5), 2.5]; official: the release's delta U[-1.5, 1.5]
    spec = ViewSpec(size=32, brightness=1.5, contrast=0.4, saturation=0.2, hue=0.1, blur_sigma=(0.1, 2.0),
                    semantics=semantics)
    p = BatchedPhotometric(spec).sample_params(N, gen(0))
    for values, low, high in [
        (p.brightness, *brightness), (p.contrast, 0.6, 1.4), (p.saturation, 0.8, 1.2),
        (p.hue, -0.1, 0.1), (p.sigma, 0.1, 2.0),
    ]:
        assert low <= values.min() < low + 0.02 * (high - low) and high - 0.02 * (high - low) < values.max() <= high
        assert values.std().item() == pytest.approx((high - low) / math.sqrt(12), rel=0.05)


def test_all_jitter_orders_occur_in_one_batch():
    p = BatchedPhotometric(ViewSpec(size=8)).sample_params(N, gen(0))
    orders = [tuple(o) for o in p.order.tolist()]
    assert set(orders) == set(permutations(range(4)))
    for order in set(orders):
        assert abs(orders.count(order) / N - 1 / 24) < 5 * math.sqrt((1 / 24) * (23 / 24) / N)


@SEMANTICS
def test_generator_controls_the_draws(semantics):
    aug = BatchedPhotometric(byol_view_specs(8, semantics=semantics)[1])
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=gen(0))
    torch.testing.assert_close(aug(x, gen(7)), aug(x, gen(7)), atol=0, rtol=0)  # same seed, same views
    g = gen(7)
    first, second = aug.sample_params(16, g), aug.sample_params(16, g)
    assert not torch.equal(first.brightness, second.brightness)
    assert not torch.equal(first.order, second.order)
    # Two calls on one generator give two different views of every sample.
    a, b = aug(x, g), aug(x, g)
    assert ((a - b).flatten(1).abs().amax(1) > 1e-3).all()


def test_views_t_and_t_prime_probabilities():
    # docs/method.md §3: blur 1.0 in T vs 0.1 in T'; solarize never in T vs 0.2 in T'.
    t1, t2 = byol_view_specs(32)
    p1 = BatchedPhotometric(t1).sample_params(N, gen(0))
    p2 = BatchedPhotometric(t2).sample_params(N, gen(1))
    assert p1.blur.all() and not p1.solarize.any()
    assert_rate(p2.blur.sum().item(), N, 0.1)
    assert_rate(p2.solarize.sum().item(), N, 0.2)
    for p in (p1, p2):
        assert_rate(p.jitter.sum().item(), N, 0.8)
        assert_rate(p.grayscale.sum().item(), N, 0.2)
