"""Show that each fixture test of tests/test_augment_official.py fails when its op is switched to the
torchvision semantics (docs/fidelity.md, "Shown once"). Runs in the project's own venv, no jax:

    for op in crop_box resize brightness contrast saturation blur; do
        for mode in official torchvision; do python tools/official_reference/switch_semantics.py $op $mode; done
    done

Each run replaces (or keeps) one function of ``byol.augment.official`` before the tests are collected
and prints ``SWITCH <op> <mode>: exit <pytest's exit code>`` (0: the fixture test passed).
"""
import sys

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from byol.augment import batched, official


def tv_crop(h, w, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop sampler (its own draws) in place of the one-draw crop."""
    from torchvision.transforms.v2 import RandomResizedCrop

    torch.manual_seed(int(u[0] * 1e6))
    p = RandomResizedCrop(8, scale=scale, ratio=ratio).make_params([torch.zeros(3, h, w)])
    return p["top"], p["left"], p["height"], p["width"]
def tv_resize(x, size):
    return TF.resize(x.float(), list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
def tv_brightness(x, d):  # multiply by 1 + delta
    return x * (1 + d.view(-1, 1, 1, 1))
def tv_contrast(x, f):
    return batched.adjust_contrast(x, f)
def tv_saturation(x, f):
    return batched.adjust_saturation(x, f)
def tv_blur(x, sigma, radius):
    return x if radius == 0 else batched.gaussian_blur(x, sigma, 2 * radius + 1)

cases = {"crop_box": ("crop_box", tv_crop, "test_crop_box_matches_the_release"),
         "resize": ("resize_bicubic", tv_resize, "test_resize_matches_tensorflow"),
         "brightness": ("adjust_brightness", tv_brightness, "test_colour_op_matches_the_release and brightness"),
         "contrast": ("adjust_contrast", tv_contrast, "test_colour_op_matches_the_release and contrast"),
         "saturation": ("adjust_saturation", tv_saturation, "test_colour_op_matches_the_release and saturation"),
         "blur": ("gaussian_blur", tv_blur, "test_blur_matches_the_release")}
if __name__ == "__main__":
    name, mode = sys.argv[1], sys.argv[2]
    attr, fn, sel = cases[name]
    if mode == "torchvision":
        setattr(official, attr, fn)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_augment_official.py", "-k", sel])
    print(f"SWITCH {name} {mode}: exit {int(rc)}", flush=True)
