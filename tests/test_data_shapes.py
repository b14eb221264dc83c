"""Procedural shapes: determinism, shapes/dtypes, balanced labels, nuisances that really vary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from byol.data.shapes import CLASSES, ShapesDataset, render


def test_sample_shape_dtype_and_transform():
    img, label = ShapesDataset(5, image_size=24)[3]
    assert img.shape == (3, 24, 24) and img.dtype == torch.uint8 and label == 3
    sample, _ = ShapesDataset(5, transform=lambda t: t.float().mean())[0]
    assert sample.ndim == 0 and sample.dtype == torch.float32
    with pytest.raises(IndexError):
        ShapesDataset(5)[5]


def test_deterministic_regardless_of_access_order():
    a, b = ShapesDataset(40, seed=7), ShapesDataset(40, seed=7)
    forward = [a[i][0] for i in range(40)]
    backward = {i: b[i][0] for i in reversed(range(40))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(40))
    assert np.array_equal(render(11, seed=7), a[11][0].permute(1, 2, 0).numpy())


def test_different_seed_gives_different_images():
    a, b = ShapesDataset(16, seed=0), ShapesDataset(16, seed=1)
    assert all(not torch.equal(a[i][0], b[i][0]) for i in range(16))
    # and images within one seed differ from each other
    assert len({a[i][0].numpy().tobytes() for i in range(16)}) == 16


def test_labels_balanced_and_all_classes_present():
    ds = ShapesDataset(83)
    assert len(CLASSES) == len(set(CLASSES)) == 8 and ds.classes == CLASSES
    counts = np.bincount(ds.labels, minlength=8)
    assert counts.max() - counts.min() <= 1 and (counts > 0).all()
    assert [ds[i][1] for i in range(16)] == ds.labels[:16] == [i % 8 for i in range(16)]


def test_nuisances_vary_within_a_class_and_colour_is_uninformative():
    ds = ShapesDataset(8 * 64, seed=0, colour=True)
    imgs = np.stack([ds.render(i) for i in range(len(ds))]).astype(np.float64)  # [N, H, W, 3]
    labels = np.array(ds.labels)
    means = imgs.mean((1, 2))  # [N, 3] mean colour per image
    for c in range(8):
        assert means[labels == c].std(0).min() > 20  # colour varies a lot inside a class
    # ... while the class-average colour is nearly the same for every class
    class_means = np.stack([means[labels == c].mean(0) for c in range(8)])
    assert class_means.std(0).max() < 0.35 * means.std(0).min()
    # backgrounds: some flat, some varying (gradient / noise); judged from the corner pixels
    corners = imgs[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # [N, 4, 3]
    varying = corners.std(1).max(1) > 8
    assert 0.2 < varying.mean() < 0.8


def test_shape_is_visible_and_size_varies():
    ds = ShapesDataset(8 * 16, seed=3, colour=True)
    areas = []
    for i in range(len(ds)):
        img = ds.render(i).astype(np.float64)
        bg = img[[0, 0, -1, -1], [0, -1, 0, -1]].mean(0)
        fg_mask = np.abs(img - bg).max(-1) > 25  # pixels clearly off the background colour
        areas.append(fg_mask.mean())
    areas = np.array(areas)
    assert areas.min() > 0.03  # never a speck that random crops would miss
    assert areas.max() / np.median(areas) > 2  # sizes differ


def test_validates_arguments():
    for kwargs in ({"n": 0}, {"n": 4, "image_size": 4}, {"n": 4, "seed": -1}):
        with pytest.raises(ValueError, match=str(list(kwargs.values())[-1])):
            ShapesDataset(**kwargs)


def test_default_is_white_shapes_on_black_that_vary_in_size_position_rotation():
    ds = ShapesDataset(8 * 16, seed=1)
    imgs = np.stack([ds.render(i) for i in range(len(ds))]).astype(np.float64)  # [N, H, W, 3]
    assert (imgs[..., 0] == imgs[..., 1]).all() and (imgs[..., 1] == imgs[..., 2]).all()
    assert imgs.max() == 255 and (imgs[:, [0, 0, -1, -1], [0, -1, 0, -1]] == 0).mean() > 0.9
    masks = imgs[..., 0] > 127
    areas = masks.mean((1, 2))
    ys, xs = np.mgrid[:32, :32]
    cx = (masks * xs).sum((1, 2)) / masks.sum((1, 2))
    assert areas.min() > 0.03 and areas.max() / areas.min() > 2 and cx.std() > 2
    squares = [masks[i] for i in range(len(ds)) if ds.labels[i] == 1]  # rotation varies
    assert len({m.tobytes() for m in squares}) == len(squares)
