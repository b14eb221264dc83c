"""The rules that turn ``auto`` config values into numbers, from facts about the data and the device.

Each rule is a pure function of ``DataFacts``, ``DeviceFacts`` and the values already chosen, and
returns a ``Choice``: the key, the value and the reason printed in the start summary and written
beside the value in the run's config.yaml. docs/auto.md states every rule and what it rests on.

    augment.size        the largest of SIZES not above the images' median shorter side (at least
                        32), capped per device: 32 px on a CPU (in 5-15 CPU minutes 64 px bought
                        too few steps to beat random init; 32 px did), 224 px on a GPU
    model.cifar_stem    true at 64 px and below (a 7x7/2 stem and max pool leave 2x2 maps at 32 px)
    model.backbone      a CPU: resnet18; a GPU: resnet18 below 200,000 images, resnet50 from there
    model.width         a CPU: 0.25; a GPU: 1
    model.projector_hidden, projector_out, predictor_hidden
                        a CPU: 512, 128, 512 (the measured CPU presets); a GPU: 4096, 256, 4096
    optim.batch_size    a power of two: at most 1/8 of the images (8 steps an epoch at least), at
                        most 256 on a CPU, at most 4096 (the paper's) on a GPU, where it is also
                        the largest the memory probe found to fit; the peak lr follows it as
                        base_lr x batch / 256
    optim.base_lr       a CPU: 1.0 (the measured CPU presets); a GPU: the paper's preset for the
                        nearest run length (0.45 at 40 and 100 epochs, 0.3 at 300, 0.2 at 1000)
    method.tau_base     1 - 11 * steps^-0.63, within [0.7, 0.996]: through the paper's 40-epoch
                        (12.5k steps, 0.97) and 1000-epoch (313k steps, 0.996) presets, which also
                        gives 0.99 at 300 epochs and 0.78 at 500 steps, where our CPU screens
                        found 0.7-0.8 best (0.7 the best value screened: the floor)
    optim.warmup_epochs 10 epochs (the paper's), at most a tenth of the run
    optim.predictor_lr_scale
                        10 up to 2000 steps (measured at 535-1706 steps: +3 to +5.5 kNN points),
                        1 (the paper's) for longer runs, where a faster predictor was not measured
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from byol.presets import PAPER_SCHEDULES

SIZES = (32, 64, 96, 128, 160, 192, 224)
SIZE_CAP = {"cpu": 32, "cuda": 224}
BATCH_CAP = {"cpu": 256, "cuda": 4096}
MIN_STEPS_PER_EPOCH = 8
LARGE_DATA = 200_000  # images from which a GPU run takes ResNet-50
TAU_SCALE, TAU_POWER = 11.0, 0.63
TAU_RANGE = (0.7, 0.996)
WARMUP_EPOCHS, WARMUP_FRACTION = 10.0, 0.1
FAST_PREDICTOR_STEPS, FAST_PREDICTOR_SCALE = 2000, 10.0  # the longest measured runs: 1706 steps


@dataclass(frozen=True)
class DataFacts:
    """What the rules need to know about the images: the training images (after the held-out
    split) and the median shorter side of the ``sampled`` images whose size was read."""

    images: int
    short_side: int
    sampled: int


@dataclass(frozen=True)
class DeviceFacts:
    """Where the run trains: ``kind`` "cpu" or "cuda", its name, and the number of processes (the
    global batch splits over them)."""

    kind: str
    name: str
    processes: int = 1


@dataclass(frozen=True)
class Choice:
    key: str  # "section.field"
    value: Any
    reason: str

    def line(self) -> str:
        return f"{self.key}={self.value} ({self.reason})"


def choose_size(data: DataFacts, device: DeviceFacts) -> Choice:
    cap = SIZE_CAP[device.kind]
    side = min(data.short_side, cap)
    value = max([s for s in SIZES if s <= side], default=SIZES[0])
    why = f"median shorter side {data.short_side} px over {data.sampled} images"
    if data.short_side > cap:
        why += f", capped at {cap} px on a {device.kind.upper()}"
    return Choice("augment.size", value, why)


def choose_stem(size: int) -> Choice:
    small = size <= 64
    why = (f"{size} px: a 3x3 stem without max pool keeps the feature maps large" if small
           else f"{size} px: the ImageNet stem")
    return Choice("model.cifar_stem", small, why)


def choose_backbone(data: DataFacts, device: DeviceFacts) -> Choice:
    if device.kind == "cpu":
        return Choice("model.backbone", "resnet18", "a CPU: the small ResNet")
    if data.images < LARGE_DATA:
        return Choice("model.backbone", "resnet18", f"{data.images} images < {LARGE_DATA}")
    return Choice("model.backbone", "resnet50", f"{data.images} images >= {LARGE_DATA}: the paper's encoder")


def choose_width(device: DeviceFacts) -> Choice:
    if device.kind == "cpu":
        return Choice("model.width", 0.25, "a CPU: a quarter-width ResNet, the shape that learned most in "
                                           "a 10-minute CPU budget")
    return Choice("model.width", 1.0, "a GPU: full width")


def _power_of_two_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def choose_batch(data: DataFacts, device: DeviceFacts, fits: int | None) -> Choice:
    """``fits``: the largest batch the memory probe found to fit (None: not probed, a CPU)."""
    limits = [(_power_of_two_at_most(max(2, data.images // MIN_STEPS_PER_EPOCH)),
               f"{MIN_STEPS_PER_EPOCH} steps an epoch at least"),
              (BATCH_CAP[device.kind], f"at most {BATCH_CAP[device.kind]} on a {device.kind.upper()}")]
    if fits is not None:
        limits.append((fits, "the largest that fits in device memory with headroom"))
    value, why = min(limits, key=lambda lw: lw[0])
    value = max(value - value % device.processes, device.processes * 2)
    return Choice("optim.batch_size", value, f"{why}; the peak lr is base_lr x {value}/256")


def choose_heads(device: DeviceFacts) -> list[Choice]:
    if device.kind == "cpu":
        why = "a CPU: the small heads of the measured CPU presets"
        sizes = (512, 128, 512)
    else:
        why, sizes = "a GPU: the paper's heads", (4096, 256, 4096)
    keys = ("model.projector_hidden", "model.projector_out", "model.predictor_hidden")
    return [Choice(k, v, why) for k, v in zip(keys, sizes)]


def choose_base_lr(device: DeviceFacts, epochs: float) -> Choice:
    """A CPU: 1.0 (the measured CPU presets); a GPU: the paper's preset for the nearest length."""
    if device.kind == "cpu":
        return Choice("optim.base_lr", 1.0, "a CPU: the measured CPU presets' base lr")
    nearest = min(PAPER_SCHEDULES, key=lambda e: abs(math.log(max(epochs, 1e-3) / e)))
    value = PAPER_SCHEDULES[nearest]["base_lr"]
    return Choice("optim.base_lr", value, f"about {epochs:.3g} epochs: the paper's {nearest}-epoch preset")


def tau_for_steps(steps: int) -> float:
    lo, hi = TAU_RANGE
    tau = 1.0 - TAU_SCALE * max(steps, 1) ** -TAU_POWER
    return round(min(hi, max(lo, tau)), 3)


def choose_tau(steps: int, estimated: bool) -> Choice:
    about = "about " if estimated else ""
    return Choice("method.tau_base", tau_for_steps(steps),
                  f"{about}{steps} steps: 1 - {TAU_SCALE:g} x steps^-{TAU_POWER} within {TAU_RANGE}")


def choose_warmup(epochs: float) -> Choice:
    value = round(min(WARMUP_EPOCHS, WARMUP_FRACTION * epochs), 2)
    why = (f"{WARMUP_EPOCHS:g} epochs (the paper's)" if value == WARMUP_EPOCHS
           else f"a tenth of about {epochs:.3g} epochs")
    return Choice("optim.warmup_epochs", value, why)


def choose_predictor_lr(steps: int, estimated: bool) -> Choice:
    about = "about " if estimated else ""
    if steps <= FAST_PREDICTOR_STEPS:
        return Choice("optim.predictor_lr_scale", FAST_PREDICTOR_SCALE,
                      f"{about}{steps} steps <= {FAST_PREDICTOR_STEPS}: a short run wants a predictor that "
                      "keeps up (measured on CPU presets)")
    return Choice("optim.predictor_lr_scale", 1.0, f"{about}{steps} steps > {FAST_PREDICTOR_STEPS}: the paper's")


# What our small-folder measurements found (docs/benchmarks.md, "Small folders"): every
# from-scratch run of fewer than this many steps ended below the random-init encoder (158 and 320
# steps: -3.5 and -2.5 kNN points); every longer one ended above it.
FEW_STEPS = 500


def small_data_note(images: int, init: str | None, steps: int | None) -> str | None:
    """The start summary's warning when from-scratch pretraining is unlikely to beat the
    random-init encoder (``steps``: the run's expected steps, None when unknown), or None."""
    if init is not None or steps is None or steps >= FEW_STEPS:
        return None
    return (f"about {steps} steps on {images} images: below {FEW_STEPS} steps, BYOL from scratch ended below "
            "the random-init encoder in our measurements (docs/benchmarks.md, small folders); give a longer "
            "train.budget, a smaller augment.size or model, or start from weights trained elsewhere "
            "(model.init=PATH)")
