"""The schedules of docs/method.md §1 and §4 at their known points."""
from __future__ import annotations

import pytest

from byol.optim import constant_tau, cosine_tau, scaled_lr, warmup_cosine_lr

TOTAL, WARMUP, PEAK = 1100, 100, 0.8


def test_warmup_cosine_known_points():
    assert warmup_cosine_lr(0, TOTAL, WARMUP, PEAK) == 0.0
    assert warmup_cosine_lr(WARMUP // 4, TOTAL, WARMUP, PEAK) == pytest.approx(PEAK / 4)
    assert warmup_cosine_lr(WARMUP, TOTAL, WARMUP, PEAK) == PEAK
    halfway = WARMUP + (TOTAL - WARMUP) // 2
    assert warmup_cosine_lr(halfway, TOTAL, WARMUP, PEAK) == PEAK / 2
    assert warmup_cosine_lr(TOTAL, TOTAL, WARMUP, PEAK) == 0.0
    assert warmup_cosine_lr(TOTAL + 50, TOTAL, WARMUP, PEAK) == 0.0  # clamped beyond the end


def test_warmup_cosine_final_lr_and_monotone():
    final = 0.1
    assert warmup_cosine_lr(TOTAL, TOTAL, WARMUP, PEAK, final) == final
    assert warmup_cosine_lr(600, TOTAL, WARMUP, PEAK, final) == pytest.approx((PEAK + final) / 2)
    lrs = [warmup_cosine_lr(s, TOTAL, WARMUP, PEAK, final) for s in range(TOTAL + 1)]
    assert all(a < b for a, b in zip(lrs[:WARMUP], lrs[1:WARMUP + 1]))
    assert all(a >= b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:]))


def test_no_warmup_is_pure_cosine():
    assert warmup_cosine_lr(0, 10, 0, PEAK) == PEAK
    assert warmup_cosine_lr(5, 10, 0, PEAK) == PEAK / 2
    assert warmup_cosine_lr(10, 10, 0, PEAK) == 0.0


@pytest.mark.parametrize("args", [
    (0, 0, 0, PEAK),        # total_steps must be > 0
    (0, 10, -1, PEAK),      # warmup_steps < 0
    (0, 10, 11, PEAK),      # warmup_steps > total_steps
    (-1, 10, 2, PEAK),      # negative step
])
def test_warmup_cosine_validation(args):
    with pytest.raises(ValueError):
        warmup_cosine_lr(*args)


@pytest.mark.parametrize("tau_base", [0.0, 0.9, 0.99, 0.996, 1.0])
def test_cosine_tau_known_points(tau_base):
    assert cosine_tau(0, 1000, tau_base) == pytest.approx(tau_base, abs=1e-15)
    assert cosine_tau(500, 1000, tau_base) == pytest.approx((1 + tau_base) / 2, abs=1e-15)
    assert cosine_tau(1000, 1000, tau_base) == 1.0
    assert cosine_tau(2000, 1000, tau_base) == 1.0


def test_constant_tau():
    assert [constant_tau(s, 10, 0.99) for s in (0, 5, 10, 20)] == [0.99] * 4


@pytest.mark.parametrize("fn", [cosine_tau, constant_tau])
@pytest.mark.parametrize("args", [(0, 10, -0.1), (0, 10, 1.5), (0, 0, 0.99), (-1, 10, 0.99)])
def test_tau_validation(fn, args):
    with pytest.raises(ValueError):
        fn(*args)


def test_scaled_lr():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)  # docs/method.md §4: 0.2 x 4096 / 256
    assert scaled_lr(0.4, 512) == pytest.approx(0.8)
    assert scaled_lr(0.3, 256) == 0.3
    with pytest.raises(ValueError, match="batch_size"):
        scaled_lr(0.2, 0)
    with pytest.raises(ValueError, match="base_lr"):
        scaled_lr(-0.2, 256)
