"""The paper's tables (docs/method.md §3 and §4) as data."""
from __future__ import annotations

import pytest

from byol import presets
from byol.presets import AUGMENT_SETS, PAPER_SCHEDULES, paper_schedule


def test_paper_schedules_table():
    assert PAPER_SCHEDULES == {
        40: {"base_lr": 0.45, "weight_decay": 1e-6, "tau_base": 0.97},
        100: {"base_lr": 0.45, "weight_decay": 1e-6, "tau_base": 0.99},
        300: {"base_lr": 0.3, "weight_decay": 1e-6, "tau_base": 0.99},
        1000: {"base_lr": 0.2, "weight_decay": 1.5e-6, "tau_base": 0.996},
    }
    assert (presets.PAPER_BATCH_SIZE, presets.PAPER_WARMUP_EPOCHS) == (4096, 10)
    assert (presets.PAPER_MOMENTUM, presets.PAPER_TRUST_COEFFICIENT) == (0.9, 1e-3)


def test_paper_schedule_returns_a_copy():
    got = paper_schedule(1000)
    assert got == {"base_lr": 0.2, "weight_decay": 1.5e-6, "tau_base": 0.996}
    got["base_lr"] = 99.0
    assert PAPER_SCHEDULES[1000]["base_lr"] == 0.2


def test_paper_schedule_unknown_length():
    with pytest.raises(ValueError) as err:
        paper_schedule(200)
    assert "200" in str(err.value) and "40, 100, 300, 1000" in str(err.value)


KEYS = {"size", "crop_scale", "crop_ratio", "flip_prob", "jitter_prob", "brightness", "contrast",
        "saturation", "hue", "grayscale_prob", "blur_prob", "blur_sigma", "solarize_prob", "mean", "std"}


def test_augment_sets_table6():
    byol = AUGMENT_SETS["byol"]
    assert set(byol) == KEYS
    assert byol == {
        "size": 224, "crop_scale": (0.08, 1.0), "crop_ratio": (3 / 4, 4 / 3), "flip_prob": 0.5,
        "jitter_prob": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1,
        "grayscale_prob": 0.2, "blur_prob": (1.0, 0.1), "blur_sigma": (0.1, 2.0),
        "solarize_prob": (0.0, 0.2), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    }


def test_augment_set_32px_drops_blur_only():
    small, big = AUGMENT_SETS["byol32"], AUGMENT_SETS["byol"]
    assert small["size"] == 32 and small["blur_prob"] == (0.0, 0.0)
    assert {k: v for k, v in small.items() if k not in ("size", "blur_prob")} == \
           {k: v for k, v in big.items() if k not in ("size", "blur_prob")}
