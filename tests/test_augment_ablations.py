"""augment.ablation: the augmentation sets of the paper's ablation (docs/method.md §7) as one key."""
from __future__ import annotations

import pytest
import torch

from byol.config import load_config
from byol.config.sections import ConfigError
from byol.data.pipeline import DeviceViews


def _aug(*extra):
    a = load_config(None, ["augment.preset=byol32", "augment.size=16", *extra]).augment
    return a.jitter_prob, a.grayscale_prob, a.blur_prob, a.solarize_prob


def test_each_set_switches_off_its_steps_and_wins_over_keys_set():
    full = load_config(None, ["augment.preset=byol"]).augment
    assert (full.jitter_prob, full.grayscale_prob, full.blur_prob, full.solarize_prob) == (
        0.8, 0.2, (1.0, 0.1), (0.0, 0.2))
    byol = ("augment.preset=byol",)
    assert _aug(*byol, "augment.ablation=no_colour") == (0.0, 0.0, (1.0, 0.1), (0.0, 0.2))
    assert _aug(*byol, "augment.ablation=no_grayscale") == (0.8, 0.0, (1.0, 0.1), (0.0, 0.2))
    assert _aug(*byol, "augment.ablation=crop_only") == (0.0, 0.0, (0.0, 0.0), (0.0, 0.0))
    assert _aug(*byol, "augment.ablation=crop_blur") == (0.0, 0.0, (1.0, 0.1), (0.0, 0.0))
    assert _aug(*byol, "augment.ablation=crop_colour") == (0.8, 0.2, (0.0, 0.0), (0.0, 0.0))
    assert _aug("augment.ablation=no_colour", "augment.jitter_prob=0.5")[0] == 0.0
    with pytest.raises(ConfigError, match="augment.ablation must be one of full, no_colour"):
        load_config(None, ["augment.ablation=no_crop"])


def test_crop_only_leaves_the_pixels_to_the_crop():
    """With every photometric step off the batched stage only scales and normalises."""
    aug = load_config(None, ["augment.preset=byol", "augment.size=16", "augment.ablation=crop_only"]).augment
    x1, x2 = (torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8) for _ in range(2))
    v1, v2 = DeviceViews(aug, seed=0)(x1, x2, step=3)
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    for x, v in ((x1, v1), (x2, v2)):
        torch.testing.assert_close(v, (x.float() / 255 - mean) / std, atol=1e-6, rtol=0)
    full = load_config(None, ["augment.preset=byol", "augment.size=16"]).augment
    w1, _ = DeviceViews(full, seed=0)(x1, x2, step=3)
    assert not torch.allclose(w1, v1, atol=1e-3)  # the full set does change colours
