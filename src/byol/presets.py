"""The paper's tables as data (docs/method.md §3 and §4): each number is typed here once.

``PAPER_SCHEDULES`` holds the official presets by run length; ``AUGMENT_SETS`` the view
distributions T and T' by name, with keys that match the fields of ``config.Augment``. The
defaults of ``config.Optim``, ``config.Method``, ``config.Augment`` and
``augment.views.ViewSpec`` are read from here: the paper's 1000-epoch run and its Table 6.
"""
from __future__ import annotations

from typing import Any

# docs/method.md §4: batch 4096 on 512 TPU v3 cores, 10 warm-up epochs, LARS momentum 0.9,
# eta 1e-3; the headline run is 1000 epochs long.
PAPER_EPOCHS = 1000
PAPER_BATCH_SIZE = 4096
PAPER_WARMUP_EPOCHS = 10
PAPER_MOMENTUM = 0.9
PAPER_TRUST_COEFFICIENT = 1e-3

# docs/method.md §4, official presets by length: epochs -> base lr (scaled by batch / 256), weight
# decay, tau_base. Shorter runs use a smaller tau_base so the target keeps up with the online net.
PAPER_SCHEDULES: dict[int, dict[str, float]] = {
    40: {"base_lr": 0.45, "weight_decay": 1e-6, "tau_base": 0.97},
    100: {"base_lr": 0.45, "weight_decay": 1e-6, "tau_base": 0.99},
    300: {"base_lr": 0.3, "weight_decay": 1e-6, "tau_base": 0.99},
    1000: {"base_lr": 0.2, "weight_decay": 1.5e-6, "tau_base": 0.996},
}


def paper_schedule(epochs: int) -> dict[str, float]:
    """The official (base_lr, weight_decay, tau_base) for a run of ``epochs`` (docs/method.md §4).

    Returns a copy, so callers may change it without touching the table.
    """
    if epochs not in PAPER_SCHEDULES:
        valid = ", ".join(str(e) for e in PAPER_SCHEDULES)
        raise ValueError(f"paper_schedule: no official preset for {epochs} epochs (choose from {valid})")
    return dict(PAPER_SCHEDULES[epochs])


# The ImageNet channel statistics the views are normalised with (docs/method.md §3).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The blur kernel side as a fraction of the image side: 23 px at 224 (docs/method.md §3).
BLUR_KERNEL_FRACTION = 0.1

# docs/method.md §3 (paper Table 6). Pairs are (min, max) ranges, except blur_prob and
# solarize_prob, which are (T, T') probabilities: the asymmetry between the views is part of the
# method. The defaults of config.Augment and, view by view, of augment.views.ViewSpec.
BYOL_AUGMENT: dict[str, Any] = {
    "size": 224,
    "crop_scale": (0.08, 1.0),
    "crop_ratio": (3 / 4, 4 / 3),
    "flip_prob": 0.5,
    "jitter_prob": 0.8,
    "brightness": 0.4,
    "contrast": 0.4,
    "saturation": 0.2,
    "hue": 0.1,
    "grayscale_prob": 0.2,
    "blur_prob": (1.0, 0.1),
    "blur_sigma": (0.1, 2.0),
    "solarize_prob": (0.0, 0.2),
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}

# How each op of T and T' is computed (docs/fidelity.md): official, as the authors' released code
# computes it (the default: the paper's numbers were made with it), or torchvision's ops.
AUGMENT_SEMANTICS = ("official", "torchvision")

AUGMENT_SETS: dict[str, dict[str, Any]] = {
    "byol": BYOL_AUGMENT,
    # 32 px (CIFAR): blur left out, a 3-pixel kernel does little (docs/method.md §3).
    "byol32": {**BYOL_AUGMENT, "size": 32, "blur_prob": (0.0, 0.0)},
}

# Method presets (docs/method.md §7): method.name fills the fields of these sections
# that the config does not set. BYOL is the defaults. SimSiam (Chen & He 2020): no momentum
# encoder, stop-gradient on the online projection, its own heads (2048-d projection, predictor
# bottleneck 512) and optimiser (SGD, lr 0.05 x batch/256, wd 1e-4, momentum 0.9). SimCLR
# (docs/method.md §7): no predictor, no target, the generalized InfoNCE with beta = 1 (NT-Xent), LARS.
METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "byol": {},
    "simsiam": {
        "method": {"predictor": True, "target": "online_stopgrad", "loss": "regression"},
        "model": {"projector_hidden": 2048, "projector_out": 2048, "predictor_hidden": 512},
        "optim": {"name": "sgd", "base_lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9},
    },
    "simclr": {
        "method": {"predictor": False, "target": "online", "loss": "infonce", "alpha": 0.1, "beta": 1.0},
        "model": {"projector_hidden": 2048, "projector_out": 128},
        "optim": {"name": "lars", "base_lr": 0.3, "weight_decay": 1e-6},
    },
    # MoCo v2: EMA key encoder (m = 0.999), InfoNCE at T = 0.2 against a queue of 65536 past keys,
    # an MLP head without BN, SGD 0.03 x B/256, wd 1e-4, the key encoder starting as a copy of the
    # query encoder. Both views are queries and keys
    # (symmetrized like BYOL's loss) and batch norm is per view, not MoCo's shuffled BN.
    "moco": {
        "method": {"predictor": False, "target": "ema", "loss": "infonce", "alpha": 0.2, "beta": 1.0,
                   "tau_base": 0.999, "tau_schedule": "constant", "queue_size": 65536},
        "model": {"projector_hidden": 2048, "projector_out": 128, "head_norm": "none", "target_init": "copy"},
        "optim": {"name": "sgd", "base_lr": 0.03, "weight_decay": 1e-4, "momentum": 0.9},
    },
}

# Augmentation ablations (docs/method.md §7, "Augmentations"): ``augment.ablation`` switches steps of T
# and T' off on top of the preset and any keys set (crop and flip always stay). "colour" is the
# colour jitter plus grayscale, as in the paper's table.
_NO_JITTER = {"jitter_prob": 0.0}
_NO_GRAY = {"grayscale_prob": 0.0}
_NO_BLUR = {"blur_prob": (0.0, 0.0)}
_NO_SOLARIZE = {"solarize_prob": (0.0, 0.0)}
AUGMENT_ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_colour": {**_NO_JITTER, **_NO_GRAY},
    "no_grayscale": _NO_GRAY,
    "crop_only": {**_NO_JITTER, **_NO_GRAY, **_NO_BLUR, **_NO_SOLARIZE},
    "crop_blur": {**_NO_JITTER, **_NO_GRAY, **_NO_SOLARIZE},
    "crop_colour": {**_NO_BLUR, **_NO_SOLARIZE},
}
